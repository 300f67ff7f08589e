//! Times the fused kernel alone (no Python), one thread: `cargo bench --bench kernel_timing`.
//!
//! Max reads exactly the bytes mean reads, so it should cost what mean costs. The bench
//! prints max/mean and mean+max/mean for every element type, over one layer and over four
//! summed layers, and exits with status 1 when max/mean exceeds `RATIO_LIMIT`: a regression
//! guard that compares two timings from the same process instead of a time threshold, so a
//! slow or noisy machine does not trip it. (mean+max does the work of both, about twice
//! the arithmetic of mean on cache-resident data, so it is reported, not guarded.)

use std::time::Instant;

use half::{bf16, f16};
use hiddenpool::kernels::{
    pool_layers, Combine, Element, Execution, LayerView, Pool, TokenSelection,
};

const SHAPE: [usize; 3] = [32, 256, 768];
const LAYERS: usize = 4;
const RATIO_LIMIT: f64 = 1.5;
const ROUNDS: usize = 31;

/// The pool sets timed, mean first: the others are reported as ratios to it.
const POOL_SETS: [(&str, &[Pool]); 3] = [
    ("mean", &[Pool::Mean]),
    ("max", &[Pool::Max]),
    ("mean+max", &[Pool::Mean, Pool::Max]),
];

/// Median microseconds of each closure, timed in alternation (round robin), so that drift
/// in the machine's speed (this VM moves by tens of percent) hits all of them alike.
fn interleaved_medians(runs: &mut [Box<dyn FnMut() + '_>]) -> Vec<f64> {
    for run in runs.iter_mut() {
        run();
    }
    let mut times = vec![Vec::with_capacity(ROUNDS); runs.len()];
    for _ in 0..ROUNDS {
        for (run, samples) in runs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            run();
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    times
        .into_iter()
        .map(|mut samples| {
            samples.sort_by(f64::total_cmp);
            samples[samples.len() / 2]
        })
        .collect()
}

/// Times every pool set over `layer_count` layers of `T` (summed when more than one) and
/// prints one line per set; returns max/mean.
fn report<T: Element>(layers: &[Vec<T>], selection: &TokenSelection) -> f64 {
    let views: Vec<LayerView<T>> = layers
        .iter()
        .map(|values| LayerView::contiguous(values, SHAPE).unwrap())
        .collect();
    let mut runs: Vec<Box<dyn FnMut() + '_>> = POOL_SETS
        .iter()
        .map(|&(_, pools)| {
            let views = &views;
            Box::new(move || {
                let pooled = pool_layers(
                    views,
                    selection,
                    pools,
                    &Combine::Sum,
                    None,
                    Execution::Sequential,
                )
                .unwrap();
                std::hint::black_box(pooled);
            }) as Box<dyn FnMut()>
        })
        .collect();
    let medians = interleaved_medians(&mut runs);
    let bytes = (layers.len() * SHAPE.iter().product::<usize>() * std::mem::size_of::<T>()) as f64;
    for ((name, _), &micros) in POOL_SETS.iter().zip(&medians) {
        let ratio = micros / medians[0];
        println!(
            "{:>8} x{} {name:>9}: {micros:8.0} µs {:6.1} GB/s   {ratio:5.2}x mean",
            T::NAME,
            layers.len(),
            bytes / micros / 1e3,
        );
    }
    medians[1] / medians[0]
}

fn layers_of<T: Element>(convert: impl Fn(f32) -> T, count: usize) -> Vec<Vec<T>> {
    let size: usize = SHAPE.iter().product();
    (0..count)
        .map(|layer| {
            (0..size)
                .map(|i| convert(((i + layer * 13) % 97) as f32 * 0.01 - 0.4))
                .collect()
        })
        .collect()
}

fn main() {
    let [rows, tokens, _] = SHAPE;
    let mask = vec![1u8; rows * tokens];
    let selection = TokenSelection::from_contiguous_mask(&mask, rows, tokens).unwrap();
    println!("shape {SHAPE:?}, every token real, one thread, median of {ROUNDS} interleaved runs");
    let mut worst: f64 = 0.0;
    for count in [1, LAYERS] {
        worst = worst.max(report(&layers_of(|v| v, count), &selection));
        worst = worst.max(report(&layers_of(f64::from, count), &selection));
        worst = worst.max(report(&layers_of(f16::from_f32, count), &selection));
        worst = worst.max(report(&layers_of(bf16::from_f32, count), &selection));
    }
    let values = layers_of(|v| v, 1).remove(0);
    let sum_micros = interleaved_medians(&mut [Box::new(|| {
        let total: f32 = values.iter().sum();
        std::hint::black_box(total);
    })])[0];
    println!("plain sequential sum of one float32 layer (not vectorised): {sum_micros:.0} µs");
    println!("worst max/mean: {worst:.2} (limit {RATIO_LIMIT})");
    if worst > RATIO_LIMIT {
        eprintln!("FAIL: max costs more than {RATIO_LIMIT}x mean over the same bytes");
        std::process::exit(1);
    }
}
