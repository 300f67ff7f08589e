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
            job.pool_chunk_dispatch(row, 0, hidden, row_out, hidden);
            return;
        }
        let chunk_outputs: Vec<(usize, usize, Vec<T::Accumulator>)> = (0..chunks_per_row)
            .into_par_iter()
            .map(|chunk| {
                let start = chunk * chunk_width;
                let width = chunk_width.min(hidden.saturating_sub(start));
                let mut local = vec![T::Accumulator::ZERO; pools.len() * segments.len() * width];
                if width > 0 {
                    job.pool_chunk_dispatch(row, start, width, &mut local, width);
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

/// Hidden elements per accumulation pass over a row's tokens; it bounds the four token
/// buffers of the folded path. Wide on purpose: whole token rows stream best, and blocks
/// narrower than the row turn the walk over tokens into a strided one the prefetchers miss.
const BLOCK: usize = 2048;

/// Where one block's running results go; None for those no requested pool needs.
struct Accumulators<'a, A> {
    sum: Option<&'a mut [A]>,
    max: Option<&'a mut [A]>,
    weighted: Option<&'a mut [A]>,
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
    /// `pool_chunk` compiled for AVX2, FMA and F16C where the processor has them.
    fn pool_chunk_dispatch(
        &self,
        row: usize,
        start: usize,
        width: usize,
        out: &mut [T::Accumulator],
        out_hidden: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::element::has_avx2_fma_f16c() {
            // SAFETY: the processor supports the features this copy was compiled for.
            unsafe { self.pool_chunk_avx2(row, start, width, out, out_hidden) };
            return;
        }
        self.pool_chunk(row, start, width, out, out_hidden);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pool_chunk_avx2(
        &self,
        row: usize,
        start: usize,
        width: usize,
        out: &mut [T::Accumulator],
        out_hidden: usize,
    ) {
        self.pool_chunk(row, start, width, out, out_hidden);
    }

    /// Pools hidden elements `start..start + width` of one row into `out`, laid out as
    /// `[pool][segment][out_hidden]` with this chunk at `start` (or at 0 when `out_hidden`
    /// equals `width`, for a chunk-local buffer).
    #[inline(always)]
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
        // Four token buffers for the grouped accumulation; whole-width for gathers.
        let mut loaded = vec![zero; (4 * width.min(BLOCK)).max(width)];
        let mut widened = vec![zero; width];
        let mut sum = vec![zero; if needs_sum { width } else { 0 }];
        let mut max = vec![T::Accumulator::NEG_INFINITY; if needs_max { width } else { 0 }];
        let mut weighted = vec![zero; if needs_weighted { width } else { 0 }];

        for (segment_index, segment) in self.segments.iter().enumerate() {
            if needs_max || segment.len() == 1 {
                self.accumulate_row(
                    segment,
                    row,
                    start,
                    width,
                    (needs_sum, needs_max, needs_weighted),
                    (&mut sum, &mut max, &mut weighted),
                    (&mut loaded, &mut widened),
                );
            } else if needs_sum || needs_weighted {
                // Only linear pools: the pool of a weighted sum of layers is the weighted
                // sum of each layer's pool, and each layer alone is read in place (no
                // per-token combining pass).
                let one = T::Accumulator::from_f64(1.0);
                sum.fill(zero);
                weighted.fill(zero);
                let mut layer_sum = vec![zero; sum.len()];
                let mut layer_weighted = vec![zero; weighted.len()];
                for &(layer, weight) in segment.iter() {
                    self.accumulate_row(
                        &[(layer, one)],
                        row,
                        start,
                        width,
                        (needs_sum, false, needs_weighted),
                        (&mut layer_sum, &mut [], &mut layer_weighted),
                        (&mut loaded, &mut widened),
                    );
                    for (total, &part) in sum.iter_mut().zip(&layer_sum) {
                        *total += weight * part;
                    }
                    for (total, &part) in weighted.iter_mut().zip(&layer_weighted) {
                        *total += weight * part;
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

    /// Fills `sum`, `max` and `weighted` (each `width` long where needed) for hidden elements
    /// `start..start + width` of one row, block by block.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn accumulate_row(
        &self,
        segment: &[(usize, T::Accumulator)],
        row: usize,
        start: usize,
        width: usize,
        needs: (bool, bool, bool),
        targets: (
            &mut [T::Accumulator],
            &mut [T::Accumulator],
            &mut [T::Accumulator],
        ),
        scratch: (&mut [T::Accumulator], &mut [T::Accumulator]),
    ) {
        let (needs_sum, needs_max, needs_weighted) = needs;
        if !(needs_sum || needs_max || needs_weighted) {
            return;
        }
        let (sum, max, weighted) = targets;
        let (loaded, widened) = scratch;
        let positions = self.selection.row(row);
        let mut block_start = start;
        while block_start < start + width {
            let len = BLOCK.min(start + width - block_start);
            let local = block_start - start;
            let accumulators = Accumulators {
                sum: needs_sum.then(|| &mut sum[local..local + len]),
                max: needs_max.then(|| &mut max[local..local + len]),
                weighted: needs_weighted.then(|| &mut weighted[local..local + len]),
            };
            self.accumulate_block(
                segment,
                row,
                positions,
                block_start,
                len,
                accumulators,
                loaded,
                widened,
            );
            block_start += len;
        }
    }

    /// Sums, maxima and rank-weighted sums of hidden elements `start..start + len` over the
    /// row's real tokens, written into `accumulators` (each `len` long).
    ///
    /// Tokens are taken four at a time and folded together before touching the running
    /// values, so those are loaded and stored once per four tokens: the loop is then bound by
    /// reading the tokens, not by stores.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_block(
        &self,
        segment: &[(usize, T::Accumulator)],
        row: usize,
        positions: &[usize],
        start: usize,
        len: usize,
        accumulators: Accumulators<'_, T::Accumulator>,
        loaded: &mut [T::Accumulator],
        widened: &mut [T::Accumulator],
    ) {
        let (needs_sum, needs_max, needs_weighted) = (
            accumulators.sum.is_some(),
            accumulators.max.is_some(),
            accumulators.weighted.is_some(),
        );
        // The running values live in the callers' row buffers (L1-sized); an unneeded one
        // is an empty slice that the loops below never touch.
        let sum = start_at(accumulators.sum, T::Accumulator::ZERO);
        let max = start_at(accumulators.max, T::Accumulator::NEG_INFINITY);
        let weighted = start_at(accumulators.weighted, T::Accumulator::ZERO);
        let rank_weight = |rank: usize| T::Accumulator::from_f64((rank + 1) as f64);
        let (buffers, widened) = (&mut loaded[..4 * len], &mut widened[..len]);
        let (first_pair, second_pair) = buffers.split_at_mut(2 * len);
        let (buffer0, buffer1) = first_pair.split_at_mut(len);
        let (buffer2, buffer3) = second_pair.split_at_mut(len);
        // Types read in place stream fastest one token at a time; widened types gain from
        // folding four converted tokens before touching the running values.
        let group_tokens = T::as_accumulator_slice(&[]).is_none();
        let groups = if group_tokens { positions.len() / 4 } else { 0 };
        // Sum alone over one layer (mean, the common case): widen inside the fold, with no
        // buffers in between.
        let direct_layer = match segment {
            [(layer, weight)]
                if needs_sum
                    && !needs_max
                    && !needs_weighted
                    && *weight == T::Accumulator::from_f64(1.0) =>
            {
                Some(&self.layers[*layer])
            }
            _ => None,
        };
        for group in 0..groups {
            let rank = group * 4;
            let tokens = &positions[rank..rank + 4];
            if let Some(layer) = direct_layer {
                let slices = [0, 1, 2, 3].map(|slot| layer.token(row, tokens[slot], start, len));
                if let [TokenSlice::Contiguous(a), TokenSlice::Contiguous(b), TokenSlice::Contiguous(c), TokenSlice::Contiguous(d)] =
                    slices
                {
                    T::fold_four_into(sum, [a, b, c, d]);
                    continue;
                }
            }
            let v0 = self.load(segment, row, tokens[0], start, len, buffer0, widened);
            let v1 = self.load(segment, row, tokens[1], start, len, buffer1, widened);
            let v2 = self.load(segment, row, tokens[2], start, len, buffer2, widened);
            let v3 = self.load(segment, row, tokens[3], start, len, buffer3, widened);
            let (v0, v1, v2, v3) = (&v0[..len], &v1[..len], &v2[..len], &v3[..len]);
            if needs_sum {
                for ((((total, &a), &b), &c), &d) in sum.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3)
                {
                    *total += (a + b) + (c + d);
                }
            }
            if needs_max {
                for ((((largest, &a), &b), &c), &d) in
                    max.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3)
                {
                    *largest = nan_max(*largest, nan_max(nan_max(a, b), nan_max(c, d)));
                }
            }
            if needs_weighted {
                let weights = [
                    rank_weight(rank),
                    rank_weight(rank + 1),
                    rank_weight(rank + 2),
                    rank_weight(rank + 3),
                ];
                for ((((total, &a), &b), &c), &d) in
                    weighted.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3)
                {
                    *total += (weights[0] * a + weights[1] * b) + (weights[2] * c + weights[3] * d);
                }
            }
        }
        for (rank, &token) in positions.iter().enumerate().skip(groups * 4) {
            let values = self.load(segment, row, token, start, len, buffer0, widened);
            let values = &values[..len];
            if needs_sum && needs_max {
                // One pass for mean+max, the common pair: each value is loaded once.
                for ((total, largest), &value) in sum.iter_mut().zip(max.iter_mut()).zip(values) {
                    *total += value;
                    *largest = nan_max(*largest, value);
                }
            } else if needs_sum {
                for (total, &value) in sum.iter_mut().zip(values) {
                    *total += value;
                }
            } else if needs_max {
                for (largest, &value) in max.iter_mut().zip(values) {
                    *largest = nan_max(*largest, value);
                }
            }
            if needs_weighted {
                let weight = rank_weight(rank);
                for (total, &value) in weighted.iter_mut().zip(values) {
                    *total += weight * value;
                }
            }
        }
    }

    /// One token's combined hidden chunk, widened to the accumulator type. f32 and f64
    /// single-layer reads come straight from the caller's memory.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn load<'s>(
        &self,
        segment: &[(usize, T::Accumulator)],
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
        let loaded = &mut loaded[..width];
        let widened = &mut widened[..width];
        let one = T::Accumulator::from_f64(1.0);
        if let [(layer, weight)] = segment {
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

/// A running-value buffer set to its starting value, or an empty slice when not needed.
#[inline(always)]
fn start_at<A: Accumulator>(target: Option<&mut [A]>, initial: A) -> &mut [A] {
    let target = target.unwrap_or_default();
    target.fill(initial);
    target
}

/// The larger of two values, NaN if either is NaN (as torch.amax).
///
/// `a > b ? a : b` is one `vmaxps`; `a + b` is NaN exactly when either is, and the unordered
/// test picks it. Neither arm is `a` itself: when one was (`keep ? a : b`), LLVM turned
/// `*running = nan_max(*running, value)` into a masked store (`vmaskmovps`), which AMD Zen
/// microcodes; that made max 3.2x slower than mean (3,229 vs 1,019 µs, [32,256,768] f32).
#[inline(always)]
fn nan_max<A: Accumulator>(a: A, b: A) -> A {
    let larger = if a > b { a } else { b };
    if a.is_nan() || b.is_nan() {
        a + b
    } else {
        larger
    }
}

#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// The plain definition: combine per token in f64, then pool real tokens in f64.
    fn reference(
        layers: &[Vec<f64>],
        shape: [usize; 3],
        mask: &[bool],
        pools: &[Pool],
        combine: &Combine,
        index: &[i64],
    ) -> Vec<f64> {
        let [rows, tokens, hidden] = shape;
        let at = |layer: usize, row: usize, token: usize, h: usize| {
            layers[layer][(row * tokens + token) * hidden + h]
        };
        let segments: Vec<Vec<(usize, f64)>> = match combine {
            Combine::Concat => (0..layers.len()).map(|l| vec![(l, 1.0)]).collect(),
            Combine::Sum => vec![(0..layers.len()).map(|l| (l, 1.0)).collect()],
            Combine::Mean => vec![(0..layers.len())
                .map(|l| (l, 1.0 / layers.len() as f64))
                .collect()],
            Combine::Weighted(w) => vec![w.iter().cloned().enumerate().collect()],
        };
        let mut out = Vec::new();
        for row in 0..rows {
            let real: Vec<usize> = (0..tokens).filter(|&t| mask[row * tokens + t]).collect();
            for pool in pools {
                for segment in &segments {
                    let value = |token: usize, h: usize| {
                        segment
                            .iter()
                            .map(|&(l, w)| w * at(l, row, token, h))
                            .sum::<f64>()
                    };
                    for h in 0..hidden {
                        let n = real.len() as f64;
                        let v = if real.is_empty() && *pool != Pool::Index {
                            0.0
                        } else {
                            match pool {
                                Pool::Mean => real.iter().map(|&t| value(t, h)).sum::<f64>() / n,
                                Pool::Sum => real.iter().map(|&t| value(t, h)).sum::<f64>(),
                                Pool::MeanSqrtLen => {
                                    real.iter().map(|&t| value(t, h)).sum::<f64>() / n.sqrt()
                                }
                                Pool::Max => real
                                    .iter()
                                    .map(|&t| value(t, h))
                                    .fold(f64::NEG_INFINITY, f64::max),
                                Pool::WeightedMean => {
                                    real.iter()
                                        .enumerate()
                                        .map(|(i, &t)| (i + 1) as f64 * value(t, h))
                                        .sum::<f64>()
                                        / (n * (n + 1.0) / 2.0)
                                }
                                Pool::First => value(real[0], h),
                                Pool::Last => value(*real.last().unwrap(), h),
                                Pool::Index => {
                                    if index[row] < 0 {
                                        0.0
                                    } else {
                                        value(index[row] as usize, h)
                                    }
                                }
                            }
                        };
                        out.push(v);
                    }
                }
            }
        }
        out
    }

    fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
        (actual - expected).abs() <= tolerance * (1.0 + expected.abs())
    }

    #[derive(Debug, Clone)]
    struct Case {
        shape: [usize; 3],
        layers: Vec<Vec<f64>>,
        mask: Vec<bool>,
        pools: Vec<Pool>,
        combine: Combine,
        index: Vec<i64>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (0usize..5, 1usize..7, 1usize..9, 1usize..4).prop_flat_map(
            |(rows, tokens, hidden, layer_count)| {
                let size = rows * tokens * hidden;
                (
                    Just([rows, tokens, hidden]),
                    prop::collection::vec(prop::collection::vec(-4.0f64..4.0, size), layer_count),
                    prop::collection::vec(any::<bool>(), rows * tokens),
                    prop::collection::vec(prop::sample::select(Pool::ALL.to_vec()), 1..4),
                    prop_oneof![
                        Just(Combine::Sum),
                        Just(Combine::Mean),
                        Just(Combine::Concat),
                        prop::collection::vec(-1.0f64..1.0, layer_count)
                            .prop_map(Combine::Weighted),
                    ],
                    prop::collection::vec(-1i64..tokens as i64, rows),
                )
                    .prop_map(|(shape, layers, mask, pools, combine, index)| {
                        Case {
                            shape,
                            layers,
                            mask,
                            pools,
                            combine,
                            index,
                        }
                    })
            },
        )
    }

    fn run_case<T: Element>(
        case: &Case,
        convert: impl Fn(f64) -> T,
        execution: Execution,
        tolerance: f64,
    ) where
        T::Accumulator: Into<f64>,
    {
        // Round the inputs to T first so the reference sees exactly what the kernel reads.
        let stored: Vec<Vec<T>> = case
            .layers
            .iter()
            .map(|l| l.iter().map(|&v| convert(v)).collect())
            .collect();
        let widened: Vec<Vec<f64>> = stored
            .iter()
            .map(|l| l.iter().map(|v| v.widen().into()).collect())
            .collect();
        let views: Vec<LayerView<T>> = stored
            .iter()
            .map(|l| LayerView::contiguous(l, case.shape).unwrap())
            .collect();
        let selection =
            TokenSelection::from_contiguous_mask(&case.mask, case.shape[0], case.shape[1]).unwrap();
        let index = case
            .pools
            .contains(&Pool::Index)
            .then_some(case.index.as_slice());
        let pooled = pool_layers(
            &views,
            &selection,
            &case.pools,
            &case.combine,
            index,
            execution,
        )
        .unwrap();
        let expected = reference(
            &widened,
            case.shape,
            &case.mask,
            &case.pools,
            &case.combine,
            &case.index,
        );
        assert_eq!(pooled.values.len(), expected.len());
        assert_eq!(pooled.rows, case.shape[0]);
        for (position, (actual, expected)) in pooled.values.iter().zip(&expected).enumerate() {
            let actual: f64 = (*actual).into();
            assert!(
                close(actual, *expected, tolerance),
                "element {position}: {actual} != {expected}"
            );
        }
    }

    proptest! {
        #[test]
        fn every_element_type_matches_the_reference(case in case()) {
            run_case::<f64>(&case, |v| v, Execution::Sequential, 1e-12);
            run_case::<f32>(&case, |v| v as f32, Execution::Parallel, 1e-5);
            run_case::<f16>(&case, f16::from_f64, Execution::Parallel, 1e-5);
            run_case::<bf16>(&case, bf16::from_f64, Execution::Sequential, 1e-5);
        }
    }

    #[test]
    fn negative_and_transposed_strides_read_the_same_values() {
        // Logical [2, 3, 2] array; store it reversed along tokens and hidden-major.
        let shape = [2usize, 3, 2];
        let logical: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut transposed = vec![0.0f32; 12];
        // Storage order [hidden, row, token-reversed].
        for row in 0..2 {
            for token in 0..3 {
                for h in 0..2 {
                    transposed[h * 6 + row * 3 + (2 - token)] = logical[(row * 3 + token) * 2 + h];
                }
            }
        }
        let strided = LayerView::new(&transposed, 2, shape, [3, -1, 6]).unwrap();
        let plain = LayerView::contiguous(&logical, shape).unwrap();
        let mask = [true, false, true, true, true, false];
        let selection = TokenSelection::from_contiguous_mask(&mask, 2, 3).unwrap();
        let pools = Pool::ALL[..7].to_vec();
        let a = pool_layers(
            &[strided],
            &selection,
            &pools,
            &Combine::Sum,
            None,
            Execution::Sequential,
        )
        .unwrap();
        let b = pool_layers(
            &[plain],
            &selection,
            &pools,
            &Combine::Sum,
            None,
            Execution::Parallel,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(&a.values[..2], &[2.0, 3.0]); // mean of tokens 0 and 2 of row 0
    }

    #[test]
    fn views_reaching_outside_their_buffer_are_refused() {
        let data = vec![0.0f32; 10];
        assert!(LayerView::new(&data, 0, [2, 3, 2], [6, 2, 1]).is_err());
        assert!(LayerView::new(&data, 0, [1, 2, 2], [0, -2, 1]).is_err());
        assert!(LayerView::new(&data, 0, [0, 3, 2], [6, 2, 1]).is_ok());
    }

    /// One contiguous layer pooled under a contiguous `[rows, tokens]` mask.
    fn pool_one_layer<T: Element>(
        data: &[T],
        shape: [usize; 3],
        mask: &[u8],
        pools: &[Pool],
        execution: Execution,
    ) -> Vec<T::Accumulator> {
        let view = LayerView::contiguous(data, shape).unwrap();
        let selection = TokenSelection::from_contiguous_mask(mask, shape[0], shape[1]).unwrap();
        pool_layers(&[view], &selection, pools, &Combine::Sum, None, execution)
            .unwrap()
            .values
    }

    #[test]
    fn half_precision_accumulates_in_float32() {
        let thirties = vec![f16::from_f32(30.0); 4096];
        let mean = pool_one_layer(
            &thirties,
            [1, 4096, 1],
            &[1; 4096],
            &[Pool::Mean],
            Execution::Parallel,
        );
        assert_eq!(mean, vec![30.0f32]);
        let ones = vec![bf16::from_f32(1.0); 70000];
        let sum = pool_one_layer(
            &ones,
            [1, 70000, 1],
            &[1; 70000],
            &[Pool::Sum],
            Execution::Sequential,
        );
        assert_eq!(sum, vec![70000.0f32]);
    }

    #[test]
    fn padding_is_never_read_and_nan_in_real_tokens_propagates() {
        let nan = f32::NAN;
        // Row 0: real tokens 1.0, 3.0 then NaN/inf padding. Row 1: NaN in a real token.
        let data = vec![1.0, 3.0, nan, f32::INFINITY, 2.0, nan, 5.0, 7.0];
        let mask = [1u8, 1, 0, 0, 1, 1, 1, 0];
        let pools = [Pool::Mean, Pool::Max, Pool::Last];
        let out = pool_one_layer(&data, [2, 4, 1], &mask, &pools, Execution::Sequential);
        assert_eq!(&out[..3], &[2.0, 3.0, 3.0]);
        assert!(out[3].is_nan() && out[4].is_nan());
        assert_eq!(out[5], 5.0);
    }

    #[test]
    fn nan_anywhere_in_a_group_of_tokens_reaches_max_and_mean() {
        // Half types fold four tokens at a time (mean alone takes a direct path; 17 hidden
        // elements cover both the 8-wide body and the tail); a NaN in any slot must still
        // propagate.
        let pool_sets: [&[Pool]; 4] = [
            &[Pool::Mean],
            &[Pool::Max],
            &[Pool::WeightedMean],
            &[Pool::Mean, Pool::Max],
        ];
        for pools in pool_sets {
            for slot in 0..9 {
                for hidden in [1usize, 17] {
                    let mut values = vec![f16::from_f32(1.0); 9 * hidden];
                    values[slot * hidden + hidden - 1] = f16::NAN;
                    let out = pool_one_layer(
                        &values,
                        [1, 9, hidden],
                        &[1; 9],
                        pools,
                        Execution::Sequential,
                    );
                    for chunk in out.chunks(hidden) {
                        assert!(
                            chunk[hidden - 1].is_nan(),
                            "{pools:?} slot {slot}: {chunk:?}"
                        );
                        assert!(
                            chunk[..hidden - 1].iter().all(|v| *v == 1.0),
                            "{pools:?}: {chunk:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_rows_equal_padded_rows() {
        let packed: Vec<f64> = (0..10).map(|v| v as f64 * 0.5).collect();
        let selection = TokenSelection::from_offsets(&[0, 2, 2, 5], 5).unwrap();
        let view = LayerView::packed(&packed, 0, 3, [5, 2], [2, 1]).unwrap();
        let pools = Pool::ALL.to_vec();
        let out = pool_layers(
            &[view],
            &selection,
            &pools,
            &Combine::Sum,
            Some(&[1, -1, 0]),
            Execution::Sequential,
        )
        .unwrap();
        let mut padded = vec![f64::NAN; 3 * 3 * 2];
        let mut mask = vec![false; 9];
        for (row, range) in [(0usize, 0usize..2usize), (2, 2..5)] {
            for (slot, token) in range.enumerate() {
                padded[(row * 3 + slot) * 2..(row * 3 + slot) * 2 + 2]
                    .copy_from_slice(&packed[token * 2..token * 2 + 2]);
                mask[row * 3 + slot] = true;
            }
        }
        let padded_view = LayerView::contiguous(&padded, [3, 3, 2]).unwrap();
        let padded_selection = TokenSelection::from_contiguous_mask(&mask, 3, 3).unwrap();
        let expected = pool_layers(
            &[padded_view],
            &padded_selection,
            &pools,
            &Combine::Sum,
            Some(&[1, -1, 0]),
            Execution::Parallel,
        )
        .unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let data = vec![0.0f32; 8];
        let view = LayerView::contiguous(&data, [2, 2, 2]).unwrap();
        let other = LayerView::contiguous(&data, [1, 4, 2]).unwrap();
        let selection = TokenSelection::from_contiguous_mask(&[1u8; 4], 2, 2).unwrap();
        let wrong_mask = TokenSelection::from_contiguous_mask(&[1u8; 6], 2, 3).unwrap();
        let run = |layers: &[LayerView<f32>],
                   selection: &TokenSelection,
                   pools: &[Pool],
                   combine: Combine,
                   index: Option<&[i64]>| {
            pool_layers(
                layers,
                selection,
                pools,
                &combine,
                index,
                Execution::Sequential,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(
            run(&[], &selection, &[Pool::Mean], Combine::Sum, None).starts_with("hidden_states")
        );
        assert!(run(
            &[view, other],
            &selection,
            &[Pool::Mean],
            Combine::Sum,
            None
        )
        .contains("layer 1"));
        assert!(run(&[view], &wrong_mask, &[Pool::Mean], Combine::Sum, None)
            .starts_with("attention_mask"));
        assert!(run(&[view], &selection, &[], Combine::Sum, None).starts_with("pools"));
        assert!(run(&[view], &selection, &[Pool::Index], Combine::Sum, None).starts_with("index"));
        assert!(run(
            &[view],
            &selection,
            &[Pool::Index],
            Combine::Sum,
            Some(&[0, 2])
        )
        .contains("row 1"));
        assert!(run(
            &[view],
            &selection,
            &[Pool::Mean],
            Combine::Weighted(vec![1.0, 2.0]),
            None
        )
        .starts_with("layer_weights"));
    }
}
