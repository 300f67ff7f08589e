"""MTEB for hiddenpool (``pip install "hiddenpool[mteb]"``): ``model`` wraps an Encoder and
one strategy for ``mteb.evaluate``; ``evaluate`` scores many strategies of one model on MTEB
tasks at the cost of one forward pass per task; ``stsb_tasks`` builds MTEB tasks from local
STS Benchmark files for runs without the Hugging Face hub."""

from hiddenpool.mteb.local_tasks import stsb_tasks
from hiddenpool.mteb.model import HiddenpoolModel, model
from hiddenpool.mteb.sweep import Sweep, TaskScores, evaluate, resolve_tasks

__all__ = [
    "HiddenpoolModel",
    "Sweep",
    "TaskScores",
    "evaluate",
    "model",
    "resolve_tasks",
    "stsb_tasks",
]
