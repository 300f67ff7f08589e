//! How one chunk of one row is pooled: the running buffers a task reuses, the walk over a
//! row's real tokens (four at a time, layers combined per token) and the write of each
//! pool's values. `pool_layers` (the parent module) makes the chunks and the threads.

use super::super::accumulator::{pairwise, running_max, Accumulator};
use super::super::element::Element;
use super::super::selection::TokenSelection;
use super::super::view::{LayerView, TokenSlice};
use super::{Pool, Segment};

/// Hidden elements per accumulation pass over a row's tokens; it bounds the four token
/// buffers of the folded path. Wide on purpose: whole token rows stream best, and blocks
/// narrower than the row turn the walk over tokens into a strided one the prefetchers miss.
const BLOCK: usize = 2048;

/// What the requested pools need accumulated over a row's tokens; decided once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Needs {
    sum: bool,
    max: bool,
    weighted: bool,
}

impl Needs {
    pub(super) fn of(pools: &[Pool]) -> Self {
        Needs {
            sum: pools.iter().any(|pool| pool.needs_sum()),
            max: pools.contains(&Pool::Max),
            weighted: pools.contains(&Pool::WeightedMean),
        }
    }

    fn any(self) -> bool {
        self.sum || self.max || self.weighted
    }
}

/// One unit of work: hidden elements `start..start + width` of one row.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    pub(super) row: usize,
    pub(super) start: usize,
    pub(super) width: usize,
}

/// Buffers a task reuses for every chunk it pools: allocated once per task (rayon's
/// `for_each_init`), not once per row.
pub(super) struct Scratch<A> {
    /// Four tokens' combined values, a block each; one whole chunk for a gathered token.
    tokens: Vec<A>,
    /// One layer's widened values while several layers are combined.
    widened: Vec<A>,
    /// The running values over the chunk; empty where no pool needs them.
    running: RunningBuffers<A>,
    /// One layer's sums while linear pools over several layers go layer by layer.
    layer: RunningBuffers<A>,
}

struct RunningBuffers<A> {
    sum: Vec<A>,
    max: Vec<A>,
    weighted: Vec<A>,
}

impl<A: Accumulator> RunningBuffers<A> {
    fn new(width: usize, needs: Needs) -> Self {
        let sized = |needed: bool| vec![A::ZERO; if needed { width } else { 0 }];
        RunningBuffers {
            sum: sized(needs.sum),
            max: sized(needs.max),
            weighted: sized(needs.weighted),
        }
    }

    /// The first `width` elements of each buffer that exists.
    fn view(&mut self, width: usize) -> Running<'_, A> {
        Running {
            sum: part_of(&mut self.sum, 0..width),
            max: part_of(&mut self.max, 0..width),
            weighted: part_of(&mut self.weighted, 0..width),
        }
    }
}

impl<A: Accumulator> Scratch<A> {
    fn new(width: usize, needs: Needs, layered: bool) -> Self {
        let layer_needs = Needs {
            max: false,
            ..needs
        };
        Scratch {
            tokens: vec![A::ZERO; (4 * width.min(BLOCK)).max(width)],
            widened: vec![A::ZERO; width],
            running: RunningBuffers::new(width, needs),
            layer: RunningBuffers::new(if layered { width } else { 0 }, layer_needs),
        }
    }
}

/// `values[range]`, or the empty slice for a running buffer no pool needs.
fn part_of<A>(values: &mut [A], range: std::ops::Range<usize>) -> &mut [A] {
    if values.is_empty() {
        values
    } else {
        &mut values[range]
    }
}

/// Running sums, maxima and rank-weighted sums of a run of hidden elements, all the same
/// length or empty (not needed).
struct Running<'a, A> {
    sum: &'a mut [A],
    max: &'a mut [A],
    weighted: &'a mut [A],
}

impl<A: Accumulator> Running<'_, A> {
    fn needs(&self) -> Needs {
        Needs {
            sum: !self.sum.is_empty(),
            max: !self.max.is_empty(),
            weighted: !self.weighted.is_empty(),
        }
    }

    fn block(&mut self, range: std::ops::Range<usize>) -> Running<'_, A> {
        Running {
            sum: part_of(self.sum, range.clone()),
            max: part_of(self.max, range.clone()),
            weighted: part_of(self.weighted, range),
        }
    }

    fn reset(&mut self) {
        self.sum.fill(A::ZERO);
        self.max.fill(A::NEG_INFINITY);
        self.weighted.fill(A::ZERO);
    }
}

/// Where a chunk's pooled values go: `[pool][segment][hidden]` blocks of `hidden` elements,
/// the chunk at `offset` inside each block.
pub(super) struct Output<'a, A> {
    pub(super) values: &'a mut [A],
    pub(super) hidden: usize,
    pub(super) offset: usize,
}

pub(super) struct Job<'job, 'data, T: Element> {
    pub(super) layers: &'job [LayerView<'data, T>],
    pub(super) selection: &'job TokenSelection,
    pub(super) pools: &'job [Pool],
    pub(super) segments: &'job [Segment<T::Accumulator>],
    pub(super) gather: &'job [Option<usize>],
    pub(super) needs: Needs,
}

impl<'data, T: Element> Job<'_, 'data, T> {
    pub(super) fn scratch(&self, width: usize) -> Scratch<T::Accumulator> {
        let layered = self.segments.iter().any(|segment| segment.len() > 1);
        Scratch::new(width, self.needs, layered)
    }

    /// `pool_chunk` compiled for AVX2, FMA and F16C where the processor has them.
    pub(super) fn pool_chunk_dispatch(
        &self,
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
        out: Output<'_, T::Accumulator>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::super::element::has_avx2_fma_f16c() {
            // SAFETY: the processor supports the features this copy was compiled for.
            unsafe { self.pool_chunk_avx2(chunk, scratch, out) };
            return;
        }
        self.pool_chunk(chunk, scratch, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pool_chunk_avx2(
        &self,
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
        out: Output<'_, T::Accumulator>,
    ) {
        self.pool_chunk(chunk, scratch, out);
    }

    /// Pools one chunk: per segment, accumulate what the pools need, then write each pool.
    #[inline(always)]
    fn pool_chunk(
        &self,
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
        mut out: Output<'_, T::Accumulator>,
    ) {
        for (segment_index, segment) in self.segments.iter().enumerate() {
            self.accumulate(segment, chunk, scratch);
            self.write_outputs(segment_index, segment, chunk, scratch, &mut out);
        }
    }

    /// Fills the scratch's running values over one chunk for one segment.
    #[inline(always)]
    fn accumulate(
        &self,
        segment: &[(usize, T::Accumulator)],
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
    ) {
        if !self.needs.any() {
            return;
        }
        let Scratch {
            tokens,
            widened,
            running,
            layer,
        } = scratch;
        let mut running = running.view(chunk.width);
        if self.needs.max || segment.len() == 1 {
            self.accumulate_tokens(segment, chunk, &mut running, tokens, widened);
            return;
        }
        // Only linear pools: the pool of a weighted sum of layers is the weighted sum of
        // each layer's pool, and each layer alone is read in place (no per-token combining
        // pass).
        let one = T::Accumulator::from_f64(1.0);
        running.reset();
        let mut layer = layer.view(chunk.width);
        for &(index, weight) in segment {
            self.accumulate_tokens(&[(index, one)], chunk, &mut layer, tokens, widened);
            for (total, &part) in running.sum.iter_mut().zip(layer.sum.iter()) {
                *total += weight * part;
            }
            for (total, &part) in running.weighted.iter_mut().zip(layer.weighted.iter()) {
                *total += weight * part;
            }
        }
    }

    /// `accumulate` over the combined values of `segment`, block by block.
    #[inline(always)]
    fn accumulate_tokens(
        &self,
        segment: &[(usize, T::Accumulator)],
        chunk: Chunk,
        running: &mut Running<'_, T::Accumulator>,
        tokens: &mut [T::Accumulator],
        widened: &mut [T::Accumulator],
    ) {
        let end = chunk.start + chunk.width;
        let mut block_start = chunk.start;
        while block_start < end {
            let len = BLOCK.min(end - block_start);
            let local = block_start - chunk.start;
            let block = Chunk {
                row: chunk.row,
                start: block_start,
                width: len,
            };
            let mut part = running.block(local..local + len);
            self.accumulate_block(segment, block, &mut part, tokens, widened);
            block_start += len;
        }
    }

    /// Sums, maxima and rank-weighted sums of one block over the row's real tokens.
    ///
    /// Tokens are taken four at a time and folded together before touching the running
    /// values, so those are loaded and stored once per four tokens, in one pass that
    /// updates every running value (mean+max reads each token once): the loop is bound by
    /// reading the tokens, not by stores.
    #[inline(always)]
    fn accumulate_block(
        &self,
        segment: &[(usize, T::Accumulator)],
        block: Chunk,
        running: &mut Running<'_, T::Accumulator>,
        tokens: &mut [T::Accumulator],
        widened: &mut [T::Accumulator],
    ) {
        running.reset();
        let needs = running.needs();
        let positions = self.selection.row(block.row);
        let source = self.selection.source(block.row);
        let len = block.width;
        let (first_pair, second_pair) = tokens[..4 * len].split_at_mut(2 * len);
        let (buffer0, buffer1) = first_pair.split_at_mut(len);
        let (buffer2, buffer3) = second_pair.split_at_mut(len);
        // Sums and maxima over one layer at weight one (mean, max, mean+max on one layer, the
        // common cases): the element type widens four tokens inside its own fold, with no
        // buffers in between (float16 with F16C in registers).
        let direct_layer = match segment {
            [(layer, weight)] if !needs.weighted && *weight == T::Accumulator::from_f64(1.0) => {
                Some(&self.layers[*layer])
            }
            _ => None,
        };
        // float32/float64 tokens of one layer are read in place one at a time (measured
        // 2.5x faster for mean than grouping them: 908 vs 2,369 µs at [32,256,768]);
        // widened or combined tokens gain from folding four before touching the running
        // values.
        let in_place = direct_layer.is_some() && T::as_accumulator_slice(&[]).is_some();
        let groups = if in_place { 0 } else { positions.len() / 4 };
        for group in 0..groups {
            let rank = group * 4;
            let four = &positions[rank..rank + 4];
            if let Some(layer) = direct_layer {
                let slices =
                    [0, 1, 2, 3].map(|slot| layer.token(source, four[slot], block.start, len));
                if let [TokenSlice::Contiguous(a), TokenSlice::Contiguous(b), TokenSlice::Contiguous(c), TokenSlice::Contiguous(d)] =
                    slices
                {
                    let tokens = [a, b, c, d];
                    match (needs.sum, needs.max) {
                        (true, false) => {
                            T::fold_four_into::<true, false>(running.sum, running.max, tokens)
                        }
                        (false, true) => {
                            T::fold_four_into::<false, true>(running.sum, running.max, tokens)
                        }
                        _ => T::fold_four_into::<true, true>(running.sum, running.max, tokens),
                    }
                    continue;
                }
            }
            let v0 = self.load(segment, four[0], block, buffer0, widened);
            let v1 = self.load(segment, four[1], block, buffer1, widened);
            let v2 = self.load(segment, four[2], block, buffer2, widened);
            let v3 = self.load(segment, four[3], block, buffer3, widened);
            fold(needs, running, rank, [v0, v1, v2, v3]);
        }
        for (rank, &token) in positions.iter().enumerate().skip(groups * 4) {
            let values = self.load(segment, token, block, buffer0, widened);
            fold(needs, running, rank, [values]);
        }
    }

    /// Writes every pool's values for one segment of one chunk from the running values
    /// (reducing pools) or from the token itself (gathering pools).
    #[inline(always)]
    fn write_outputs(
        &self,
        segment_index: usize,
        segment: &[(usize, T::Accumulator)],
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
        out: &mut Output<'_, T::Accumulator>,
    ) {
        let positions = self.selection.row(chunk.row);
        let count = positions.len();
        let width = chunk.width;
        let zero = T::Accumulator::ZERO;
        let running = scratch.running.view(width);
        for (pool_index, pool) in self.pools.iter().enumerate() {
            let block =
                (pool_index * self.segments.len() + segment_index) * out.hidden + out.offset;
            let target = &mut out.values[block..block + width];
            let scaled =
                |divisor: f64, source: &[T::Accumulator], target: &mut [T::Accumulator]| {
                    let divisor = T::Accumulator::from_f64(divisor);
                    for (out, &total) in target.iter_mut().zip(source) {
                        *out = total / divisor;
                    }
                };
            match pool {
                _ if count == 0 && *pool != Pool::Index => target.fill(zero),
                Pool::Mean => scaled(count as f64, running.sum, target),
                Pool::Sum => target.copy_from_slice(running.sum),
                Pool::MeanSqrtLen => scaled((count as f64).sqrt(), running.sum, target),
                Pool::Max => target.copy_from_slice(running.max),
                Pool::WeightedMean => scaled(
                    count as f64 * (count as f64 + 1.0) / 2.0,
                    running.weighted,
                    target,
                ),
                Pool::First | Pool::Last | Pool::Index => {
                    let token = match pool {
                        Pool::First => Some(positions[0]),
                        Pool::Last => Some(positions[count - 1]),
                        _ => self.gather[chunk.row],
                    };
                    match token {
                        Some(token) => {
                            let values = self.load(
                                segment,
                                token,
                                chunk,
                                &mut scratch.tokens,
                                &mut scratch.widened,
                            );
                            target.copy_from_slice(values);
                        }
                        None => target.fill(zero),
                    }
                }
            }
        }
    }

    /// One token's combined values over `block`'s hidden range, widened to the accumulator
    /// type. f32 and f64 single-layer reads come straight from the caller's memory.
    #[inline(always)]
    fn load<'s>(
        &self,
        segment: &[(usize, T::Accumulator)],
        token: usize,
        block: Chunk,
        loaded: &'s mut [T::Accumulator],
        widened: &mut [T::Accumulator],
    ) -> &'s [T::Accumulator]
    where
        'data: 's,
    {
        let Chunk { row, start, width } = block;
        // The hidden-state row this output row reads (a span's row).
        let row = self.selection.source(row);
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

/// Folds `N` consecutive real tokens (ranks `rank..rank + N`) into the running values, with
/// the loop compiled once per combination of needed values (no branch inside it).
#[inline(always)]
fn fold<A: Accumulator, const N: usize>(
    needs: Needs,
    running: &mut Running<'_, A>,
    rank: usize,
    tokens: [&[A]; N],
) {
    match (needs.sum, needs.max, needs.weighted) {
        (true, false, false) => fold_as::<A, N, true, false, false>(running, rank, tokens),
        (false, true, false) => fold_as::<A, N, false, true, false>(running, rank, tokens),
        (true, true, false) => fold_as::<A, N, true, true, false>(running, rank, tokens),
        (false, false, true) => fold_as::<A, N, false, false, true>(running, rank, tokens),
        (true, false, true) => fold_as::<A, N, true, false, true>(running, rank, tokens),
        (false, true, true) => fold_as::<A, N, false, true, true>(running, rank, tokens),
        (true, true, true) => fold_as::<A, N, true, true, true>(running, rank, tokens),
        (false, false, false) => {}
    }
}

#[inline(always)]
fn fold_as<
    A: Accumulator,
    const N: usize,
    const SUM: bool,
    const MAX: bool,
    const WEIGHTED: bool,
>(
    running: &mut Running<'_, A>,
    rank: usize,
    tokens: [&[A]; N],
) {
    let len = [running.sum.len(), running.max.len(), running.weighted.len()]
        .into_iter()
        .max()
        .unwrap_or(0);
    let tokens = tokens.map(|token| &token[..len]);
    let sum = &mut running.sum[..if SUM { len } else { 0 }];
    let max = &mut running.max[..if MAX { len } else { 0 }];
    let weighted = &mut running.weighted[..if WEIGHTED { len } else { 0 }];
    let weights: [A; N] = std::array::from_fn(|slot| A::from_f64((rank + slot + 1) as f64));
    for index in 0..len {
        let values: [A; N] = std::array::from_fn(|slot| tokens[slot][index]);
        // Pairwise for four tokens: two independent operations before the running value.
        if SUM {
            sum[index] += pairwise(values, |a, b| a + b);
        }
        if MAX {
            max[index] = running_max(max[index], values);
        }
        if WEIGHTED {
            let products: [A; N] = std::array::from_fn(|slot| weights[slot] * values[slot]);
            weighted[index] += pairwise(products, |a, b| a + b);
        }
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
