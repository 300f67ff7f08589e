//! The fused kernel: combine layers per token and pool over real tokens, in one pass.
//!
//! This module holds the contract (`Pool`, `Combine`, `pool_layers`) and the phases of a
//! call: check the inputs, resolve the gathered positions and the layer segments, then pool
//! whole rows or chunks of rows across threads. How one chunk of one row is pooled (the
//! running buffers and the token loop) is `job`; the property tests are `tests`.

use rayon::prelude::*;

use super::accumulator::Accumulator;
use super::element::Element;
use super::error::KernelError;
use super::selection::TokenSelection;
use super::view::LayerView;

mod job;
#[cfg(test)]
mod tests;

use job::{Chunk, Job, Needs, Output, Scratch};

/// How the tokens of one row become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    Mean,
    Sum,
    Max,
    /// sum / sqrt(count), sentence-transformers' `mean_sqrt_len_tokens`.
    MeanSqrtLen,
    /// The i-th real token (1-based) weighs i.
    WeightedMean,
    First,
    Last,
    /// The token at a per-row position given by the caller (EOS, explicit index).
    Index,
}

impl Pool {
    pub const ALL: [Pool; 8] = [
        Pool::Mean,
        Pool::Sum,
        Pool::Max,
        Pool::MeanSqrtLen,
        Pool::WeightedMean,
        Pool::First,
        Pool::Last,
        Pool::Index,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pool::Mean => "mean",
            Pool::Sum => "sum",
            Pool::Max => "max",
            Pool::MeanSqrtLen => "mean_sqrt_len",
            Pool::WeightedMean => "weighted_mean",
            Pool::First => "first",
            Pool::Last => "last",
            Pool::Index => "index",
        }
    }

    pub fn parse(name: &str) -> Option<Pool> {
        Pool::ALL.into_iter().find(|pool| pool.name() == name)
    }

    fn needs_sum(self) -> bool {
        matches!(self, Pool::Mean | Pool::Sum | Pool::MeanSqrtLen)
    }
}

/// How several layers become one hidden vector per token.
#[derive(Debug, Clone, PartialEq)]
pub enum Combine {
    Sum,
    Mean,
    /// Layers side by side on the hidden axis, in the order given.
    Concat,
    /// One weight per layer (ScalarMix's gamma * softmax(w), computed by the caller).
    Weighted(Vec<f64>),
}

/// `[rows, width]` pooled vectors, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled<A> {
    pub values: Vec<A>,
    pub rows: usize,
    pub width: usize,
}

/// Whether the kernel may spread work over the current rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    Sequential,
    Parallel,
}

/// One output segment: a weighted sum of layers, per token.
type Segment<A> = Vec<(usize, A)>;

/// Pools `layers` (each `[B, T, H]`, or packed) over the real tokens of `selection`.
///
/// The output row is `[pool 0: segment 0 (H), segment 1 (H), ...][pool 1: ...]...`, where
/// there is one segment per layer for `Combine::Concat` and a single one otherwise.
/// `gather_index` gives one position per row (-1: none) and is required by `Pool::Index`.
/// Rows without real tokens pool to zeros.
pub fn pool_layers<T: Element>(
    layers: &[LayerView<'_, T>],
    selection: &TokenSelection,
    pools: &[Pool],
    combine: &Combine,
    gather_index: Option<&[i64]>,
    execution: Execution,
) -> Result<Pooled<T::Accumulator>, KernelError> {
    let hidden = check_layers(layers, selection)?;
    // Output rows are the selection's (spans, for a span selection), not the data's.
    let rows = selection.rows();
    let gather = gather_positions(selection, pools, gather_index)?;
    let segments = segments::<T::Accumulator>(layers.len(), combine)?;
    let row_width = pools.len() * segments.len() * hidden;
    let mut values = vec![T::Accumulator::ZERO; rows * row_width];
    if row_width == 0 || rows == 0 {
        return Ok(Pooled {
            values,
            rows,
            width: row_width,
        });
    }
    let job = Job {
        layers,
        selection,
        pools,
        segments: &segments,
        gather: &gather,
        needs: Needs::of(pools),
    };
    let threads = match execution {
        Execution::Sequential => 1,
        Execution::Parallel => rayon::current_num_threads(),
    };
    // Few rows: split the hidden axis too, so every thread has work.
    let chunks_per_row = if rows >= 2 * threads {
        1
    } else {
        (2 * threads).div_ceil(rows).min(hidden.div_ceil(64)).max(1)
    };
    if chunks_per_row == 1 {
        pool_whole_rows(&job, &mut values, row_width, hidden, execution);
    } else {
        pool_row_chunks(
            &job,
            &mut values,
            row_width,
            hidden,
            chunks_per_row,
            execution,
        );
    }
    Ok(Pooled {
        values,
        rows,
        width: row_width,
    })
}

/// The layers' common `[rows, tokens, hidden]` against each other and the selection;
/// returns `hidden`.
fn check_layers<T: Element>(
    layers: &[LayerView<'_, T>],
    selection: &TokenSelection,
) -> Result<usize, KernelError> {
    let first = layers
        .first()
        .ok_or_else(|| KernelError::invalid("hidden_states", "needs at least one layer"))?;
    let (rows, tokens, hidden) = (first.rows(), first.tokens(), first.hidden());
    for (index, layer) in layers.iter().enumerate() {
        if (layer.rows(), layer.tokens(), layer.hidden()) != (rows, tokens, hidden) {
            return Err(KernelError::invalid(
                "hidden_states",
                format!(
                    "layer {index} has shape [{}, {}, {}] but layer 0 has [{rows}, {tokens}, {hidden}]",
                    layer.rows(),
                    layer.tokens(),
                    layer.hidden()
                ),
            ));
        }
    }
    if selection.source_rows() != rows || selection.token_bound() != tokens {
        return Err(KernelError::invalid(
            "attention_mask",
            format!(
                "covers {} rows of {} tokens but hidden_states has {rows} rows of {tokens} tokens",
                selection.source_rows(),
                selection.token_bound()
            ),
        ));
    }
    Ok(hidden)
}

/// Each row's gathered position for `Pool::Index` (empty without it); the positions are
/// required by that pool and refused without it.
fn gather_positions(
    selection: &TokenSelection,
    pools: &[Pool],
    gather_index: Option<&[i64]>,
) -> Result<Vec<Option<usize>>, KernelError> {
    if pools.is_empty() {
        return Err(KernelError::invalid("pools", "needs at least one pool"));
    }
    match (pools.contains(&Pool::Index), gather_index) {
        (true, Some(index)) => selection.resolve_gather(index),
        (true, None) => Err(KernelError::invalid(
            "index",
            "the index pool needs one position per row",
        )),
        (false, Some(_)) => Err(KernelError::invalid(
            "index",
            "positions were given but no pool uses them",
        )),
        (false, None) => Ok(Vec::new()),
    }
}

/// Many rows: a task pools whole rows straight into their place in `values`.
fn pool_whole_rows<T: Element>(
    job: &Job<'_, '_, T>,
    values: &mut [T::Accumulator],
    row_width: usize,
    hidden: usize,
    execution: Execution,
) {
    let whole_row = |scratch: &mut Scratch<T::Accumulator>,
                     (row, values): (usize, &mut [T::Accumulator])| {
        let chunk = Chunk {
            row,
            start: 0,
            width: hidden,
        };
        let out = Output {
            values,
            hidden,
            offset: 0,
        };
        job.pool_chunk_dispatch(chunk, scratch, out);
    };
    match execution {
        Execution::Sequential => {
            let mut scratch = job.scratch(hidden);
            values
                .chunks_mut(row_width)
                .enumerate()
                .for_each(|row| whole_row(&mut scratch, row));
        }
        Execution::Parallel => values
            .par_chunks_mut(row_width)
            .enumerate()
            .for_each_init(|| job.scratch(hidden), whole_row),
    }
}

/// Few rows: each task pools one chunk of one row's hidden axis into a chunk-sized buffer;
/// the buffers are then copied into place (few rows, so this copy is small).
fn pool_row_chunks<T: Element>(
    job: &Job<'_, '_, T>,
    values: &mut [T::Accumulator],
    row_width: usize,
    hidden: usize,
    chunks_per_row: usize,
    execution: Execution,
) {
    let rows = values.len() / row_width;
    let chunk_width = hidden.div_ceil(chunks_per_row);
    let blocks = job.pools.len() * job.segments.len();
    let tasks: Vec<Chunk> = (0..rows)
        .flat_map(|row| {
            (0..chunks_per_row).map(move |index| {
                let start = (index * chunk_width).min(hidden);
                Chunk {
                    row,
                    start,
                    width: chunk_width.min(hidden - start),
                }
            })
        })
        .filter(|chunk| chunk.width > 0)
        .collect();
    let pool_task = |scratch: &mut Scratch<T::Accumulator>, chunk: Chunk| {
        let mut local = vec![T::Accumulator::ZERO; blocks * chunk.width];
        let out = Output {
            values: &mut local,
            hidden: chunk.width,
            offset: 0,
        };
        job.pool_chunk_dispatch(chunk, scratch, out);
        (chunk, local)
    };
    let pooled: Vec<(Chunk, Vec<T::Accumulator>)> = match execution {
        Execution::Sequential => {
            let mut scratch = job.scratch(chunk_width);
            tasks
                .into_iter()
                .map(|chunk| pool_task(&mut scratch, chunk))
                .collect()
        }
        Execution::Parallel => tasks
            .into_par_iter()
            .map_init(|| job.scratch(chunk_width), pool_task)
            .collect(),
    };
    for (chunk, local) in pooled {
        let row_out = &mut values[chunk.row * row_width..(chunk.row + 1) * row_width];
        for (block, source) in local.chunks_exact(chunk.width).enumerate() {
            let at = block * hidden + chunk.start;
            row_out[at..at + chunk.width].copy_from_slice(source);
        }
    }
}

/// Bytes a call will read: every real token for the reducing pools, one token per row for
/// each gathering pool (first, last, index). Used to decide whether threads pay off.
pub fn bytes_to_read(
    selection: &TokenSelection,
    pools: &[Pool],
    layers: usize,
    token_bytes: usize,
) -> usize {
    let reduces = pools
        .iter()
        .any(|pool| !matches!(pool, Pool::First | Pool::Last | Pool::Index));
    let gathers = pools
        .iter()
        .filter(|pool| matches!(pool, Pool::First | Pool::Last | Pool::Index))
        .count();
    let tokens = if reduces { selection.total() } else { 0 } + gathers * selection.rows();
    tokens * layers * token_bytes
}

fn segments<A: Accumulator>(
    layer_count: usize,
    combine: &Combine,
) -> Result<Vec<Segment<A>>, KernelError> {
    let one = A::from_f64(1.0);
    Ok(match combine {
        Combine::Concat => (0..layer_count).map(|layer| vec![(layer, one)]).collect(),
        Combine::Sum => vec![(0..layer_count).map(|layer| (layer, one)).collect()],
        Combine::Mean => {
            let weight = A::from_f64(1.0 / layer_count as f64);
            vec![(0..layer_count).map(|layer| (layer, weight)).collect()]
        }
        Combine::Weighted(weights) => {
            if weights.len() != layer_count {
                return Err(KernelError::invalid(
                    "layer_weights",
                    format!("has {} weights for {layer_count} layers", weights.len()),
                ));
            }
            if let Some(bad) = weights.iter().find(|w| !w.is_finite()) {
                return Err(KernelError::invalid(
                    "layer_weights",
                    format!("must be finite, got {bad}"),
                ));
            }
            vec![weights
                .iter()
                .enumerate()
                .map(|(layer, &w)| (layer, A::from_f64(w)))
                .collect()]
        }
    })
}
