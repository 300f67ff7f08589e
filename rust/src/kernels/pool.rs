//! The fused kernel: combine layers per token and pool over real tokens, in one pass.

use rayon::prelude::*;

use super::element::{Accumulator, Element};
use super::error::KernelError;
use super::selection::TokenSelection;
use super::view::{LayerView, TokenSlice};

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
    if selection.rows() != rows || selection.token_bound() != tokens {
        return Err(KernelError::invalid(
            "attention_mask",
            format!(
                "covers {} rows of {} tokens but hidden_states has {rows} rows of {tokens} tokens",
                selection.rows(),
                selection.token_bound()
            ),
        ));
    }
    if pools.is_empty() {
        return Err(KernelError::invalid("pools", "needs at least one pool"));
    }
    let gather = match (pools.contains(&Pool::Index), gather_index) {
        (true, Some(index)) => selection.resolve_gather(index)?,
        (true, None) => {
            return Err(KernelError::invalid(
                "index",
                "the index pool needs one position per row",
            ))
        }
        (false, Some(_)) => {
            return Err(KernelError::invalid(
                "index",
                "positions were given but no pool uses them",
            ))
        }
        (false, None) => Vec::new(),
    };
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
        hidden,
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
    let chunk_width = hidden.div_ceil(chunks_per_row);
    let run_row = |(row, row_out): (usize, &mut [T::Accumulator])| {
        if chunks_per_row == 1 {
            job.pool_chunk(row, 0, hidden, row_out, hidden);
            return;
        }
        let chunk_outputs: Vec<(usize, usize, Vec<T::Accumulator>)> = (0..chunks_per_row)
            .into_par_iter()
            .map(|chunk| {
                let start = chunk * chunk_width;
                let width = chunk_width.min(hidden.saturating_sub(start));
                let mut local = vec![T::Accumulator::ZERO; pools.len() * segments.len() * width];
                if width > 0 {
                    job.pool_chunk(row, start, width, &mut local, width);
                }
                (start, width, local)
            })
            .collect();
        for (start, width, local) in chunk_outputs {
            for (block, source) in local.chunks_exact(width.max(1)).enumerate() {
                if width > 0 {
                    row_out[block * hidden + start..block * hidden + start + width]
                        .copy_from_slice(source);
                }
            }
        }
    };
    match execution {
        Execution::Sequential => values.chunks_mut(row_width).enumerate().for_each(run_row),
        Execution::Parallel => values
            .par_chunks_mut(row_width)
            .enumerate()
            .for_each(run_row),
    }
    Ok(Pooled {
        values,
        rows,
        width: row_width,
    })
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

struct Job<'job, 'data, T: Element> {
    layers: &'job [LayerView<'data, T>],
    selection: &'job TokenSelection,
    pools: &'job [Pool],
    segments: &'job [Segment<T::Accumulator>],
    gather: &'job [Option<usize>],
    hidden: usize,
}

impl<'data, T: Element> Job<'_, 'data, T> {
    /// Pools hidden elements `start..start + width` of one row into `out`, laid out as
    /// `[pool][segment][out_hidden]` with this chunk at `start` (or at 0 when `out_hidden`
    /// equals `width`, for a chunk-local buffer).
    fn pool_chunk(
        &self,
        row: usize,
        start: usize,
        width: usize,
        out: &mut [T::Accumulator],
        out_hidden: usize,
    ) {
        let offset = if out_hidden == self.hidden { start } else { 0 };
        let positions = self.selection.row(row);
        let count = positions.len();
        let needs_sum = self.pools.iter().any(|pool| pool.needs_sum());
        let needs_max = self.pools.contains(&Pool::Max);
        let needs_weighted = self.pools.contains(&Pool::WeightedMean);
        let zero = T::Accumulator::ZERO;
        let mut loaded = vec![zero; width];
        let mut widened = vec![zero; width];
        let mut sum = vec![zero; if needs_sum { width } else { 0 }];
        let mut max = vec![T::Accumulator::NEG_INFINITY; if needs_max { width } else { 0 }];
        let mut weighted = vec![zero; if needs_weighted { width } else { 0 }];

        for (segment_index, segment) in self.segments.iter().enumerate() {
            if needs_sum || needs_max || needs_weighted {
                sum.fill(zero);
                max.fill(T::Accumulator::NEG_INFINITY);
                weighted.fill(zero);
                for (rank, &token) in positions.iter().enumerate() {
                    let values =
                        self.load(segment, row, token, start, width, &mut loaded, &mut widened);
                    if needs_sum {
                        for (total, &value) in sum.iter_mut().zip(values) {
                            *total += value;
                        }
                    }
                    if needs_max {
                        for (largest, &value) in max.iter_mut().zip(values) {
                            // Written so that NaN, once seen, stays (as torch.amax does).
                            if value > *largest || value.is_nan() {
                                *largest = value;
                            }
                        }
                    }
                    if needs_weighted {
                        let weight = T::Accumulator::from_f64((rank + 1) as f64);
                        for (total, &value) in weighted.iter_mut().zip(values) {
                            *total += weight * value;
                        }
                    }
                }
            }
            for (pool_index, pool) in self.pools.iter().enumerate() {
                let block =
                    (pool_index * self.segments.len() + segment_index) * out_hidden + offset;
                let target = &mut out[block..block + width];
                let scale_sum = |divisor: f64, target: &mut [T::Accumulator]| {
                    let divisor = T::Accumulator::from_f64(divisor);
                    for (out, &total) in target.iter_mut().zip(&sum) {
                        *out = total / divisor;
                    }
                };
                match pool {
                    _ if count == 0 && *pool != Pool::Index => target.fill(zero),
                    Pool::Mean => scale_sum(count as f64, target),
                    Pool::Sum => target.copy_from_slice(&sum),
                    Pool::MeanSqrtLen => scale_sum((count as f64).sqrt(), target),
                    Pool::Max => target.copy_from_slice(&max),
                    Pool::WeightedMean => {
                        let divisor =
                            T::Accumulator::from_f64(count as f64 * (count as f64 + 1.0) / 2.0);
                        for (out, &total) in target.iter_mut().zip(&weighted) {
                            *out = total / divisor;
                        }
                    }
                    Pool::First | Pool::Last | Pool::Index => {
                        let token = match pool {
                            Pool::First => Some(positions[0]),
                            Pool::Last => Some(positions[count - 1]),
                            _ => self.gather[row],
                        };
                        match token {
                            Some(token) => {
                                let values = self.load(
                                    segment,
                                    row,
                                    token,
                                    start,
                                    width,
                                    &mut loaded,
                                    &mut widened,
                                );
                                target.copy_from_slice(values);
                            }
                            None => target.fill(zero),
                        }
                    }
                }
            }
        }
    }

    /// One token's combined hidden chunk, widened to the accumulator type. f32 and f64
    /// single-layer reads come straight from the caller's memory.
    #[allow(clippy::too_many_arguments)]
    fn load<'s>(
        &self,
        segment: &Segment<T::Accumulator>,
        row: usize,
        token: usize,
        start: usize,
        width: usize,
        loaded: &'s mut [T::Accumulator],
        widened: &mut [T::Accumulator],
    ) -> &'s [T::Accumulator]
    where
        'data: 's,
    {
        let one = T::Accumulator::from_f64(1.0);
        if let [(layer, weight)] = segment.as_slice() {
            if *weight == one {
                let slice = self.layers[*layer].token(row, token, start, width);
                if let TokenSlice::Contiguous(values) = slice {
                    if let Some(in_place) = T::as_accumulator_slice(values) {
                        return in_place;
                    }
                }
                widen(slice, loaded);
                return loaded;
            }
        }
        for (position, (layer, weight)) in segment.iter().enumerate() {
            let slice = self.layers[*layer].token(row, token, start, width);
            let values: &[T::Accumulator] = match slice {
                TokenSlice::Contiguous(values) => match T::as_accumulator_slice(values) {
                    Some(in_place) => in_place,
                    None => {
                        T::widen_slice(values, widened);
                        widened
                    }
                },
                strided => {
                    widen(strided, widened);
                    widened
                }
            };
            if position == 0 {
                for (out, &value) in loaded.iter_mut().zip(values) {
                    *out = *weight * value;
                }
            } else {
                for (out, &value) in loaded.iter_mut().zip(values) {
                    *out += *weight * value;
                }
            }
        }
        loaded
    }
}

fn widen<T: Element>(slice: TokenSlice<'_, T>, out: &mut [T::Accumulator]) {
    match slice {
        TokenSlice::Contiguous(values) => T::widen_slice(values, out),
        TokenSlice::Strided {
            data,
            start,
            stride,
            len,
        } => {
            for (index, value) in out.iter_mut().take(len).enumerate() {
                *value = data[(start as isize + index as isize * stride) as usize].widen();
            }
        }
    }
}
