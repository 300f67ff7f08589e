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
    // Output rows are the selection's (spans, for a span selection), not the data's.
    let rows = selection.rows();
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
    } else {
        // Each task pools one chunk of one row into a chunk-sized buffer; the buffers are
        // then copied into place (few rows, so this copy is small).
        let chunk_width = hidden.div_ceil(chunks_per_row);
        let blocks = pools.len() * segments.len();
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

/// What the requested pools need accumulated over a row's tokens; decided once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Needs {
    sum: bool,
    max: bool,
    weighted: bool,
}

impl Needs {
    fn of(pools: &[Pool]) -> Self {
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
struct Chunk {
    row: usize,
    start: usize,
    width: usize,
}

/// Buffers a task reuses for every chunk it pools: allocated once per task (rayon's
/// `for_each_init`), not once per row.
struct Scratch<A> {
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
struct Output<'a, A> {
    values: &'a mut [A],
    hidden: usize,
    offset: usize,
}

struct Job<'job, 'data, T: Element> {
    layers: &'job [LayerView<'data, T>],
    selection: &'job TokenSelection,
    pools: &'job [Pool],
    segments: &'job [Segment<T::Accumulator>],
    gather: &'job [Option<usize>],
    needs: Needs,
}

impl<'data, T: Element> Job<'_, 'data, T> {
    fn scratch(&self, width: usize) -> Scratch<T::Accumulator> {
        let layered = self.segments.iter().any(|segment| segment.len() > 1);
        Scratch::new(width, self.needs, layered)
    }

    /// `pool_chunk` compiled for AVX2, FMA and F16C where the processor has them.
    fn pool_chunk_dispatch(
        &self,
        chunk: Chunk,
        scratch: &mut Scratch<T::Accumulator>,
        out: Output<'_, T::Accumulator>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::element::has_avx2_fma_f16c() {
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

/// `(v0 op v1) op (v2 op v3)` for four values, `v0` for one.
#[inline(always)]
pub(crate) fn pairwise<A: Copy, const N: usize>(values: [A; N], op: impl Fn(A, A) -> A) -> A {
    match N {
        4 => op(op(values[0], values[1]), op(values[2], values[3])),
        1 => values[0],
        _ => {
            let mut total = values[0];
            for &value in &values[1..] {
                total = op(total, value);
            }
            total
        }
    }
}

/// `a > b ? a : b`: one `maxps`. Not NaN-safe alone: it returns `b` when either is NaN.
#[inline(always)]
pub(crate) fn greater<A: Accumulator>(a: A, b: A) -> A {
    if a > b {
        a
    } else {
        b
    }
}

/// The running maximum after `values`, NaN once any value so far is NaN (as torch.amax).
///
/// The maximum of the new values is taken with plain `maxps` (which may drop a NaN) and the
/// NaN test is done once for all of them (`cmpunordps`, which folds pairs); a NaN running
/// value survives because `greater` returns its second operand on NaN. Eight operations per
/// four tokens instead of sixteen for pairwise NaN-safe maxima. The NaN arm is a constant,
/// not the running value: a select whose arm was the loaded running value (`keep ? a : b`)
/// became a masked store (`vmaskmovps`), which AMD Zen microcodes; that made max 3.2x
/// slower than mean (3,229 vs 1,019 µs, [32,256,768] float32, one thread).
#[inline(always)]
pub(crate) fn running_max<A: Accumulator, const N: usize>(running: A, values: [A; N]) -> A {
    let any_nan = values
        .iter()
        .fold(false, |seen, value| seen | value.is_nan());
    let largest = pairwise(values, greater);
    if any_nan {
        A::NAN
    } else {
        greater(largest, running)
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

    fn assert_all_close<A: Copy + Into<f64>>(values: &[A], expected: &[f64], tolerance: f64) {
        for (position, (&actual, expected)) in values.iter().zip(expected).enumerate() {
            let actual: f64 = actual.into();
            assert!(
                close(actual, *expected, tolerance),
                "element {position}: {actual} != {expected}"
            );
        }
    }

    /// The case's layers rounded to `T` first, so the reference sees exactly what the
    /// kernel reads.
    fn stored_layers<T: Element>(case: &Case, convert: impl Fn(f64) -> T) -> Vec<Vec<T>> {
        case.layers
            .iter()
            .map(|l| l.iter().map(|&v| convert(v)).collect())
            .collect()
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
        let stored = stored_layers(case, convert);
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
        assert_all_close(&pooled.values, &expected, tolerance);
    }

    /// Spans pooled by the kernel against the reference on a copy of each span's row whose
    /// mask keeps only the span's positions.
    fn run_spans<T: Element>(
        case: &Case,
        spans: &[[i64; 3]],
        convert: impl Fn(f64) -> T,
        execution: Execution,
        tolerance: f64,
    ) where
        T::Accumulator: Into<f64>,
    {
        let [_, tokens, hidden] = case.shape;
        let stored = stored_layers(case, convert);
        let views: Vec<LayerView<T>> = stored
            .iter()
            .map(|l| LayerView::contiguous(l, case.shape).unwrap())
            .collect();
        let selection =
            TokenSelection::from_contiguous_mask(&case.mask, case.shape[0], case.shape[1])
                .unwrap()
                .spans(spans)
                .unwrap();
        let pools: Vec<Pool> = case
            .pools
            .iter()
            .copied()
            .filter(|&pool| pool != Pool::Index)
            .collect();
        if pools.is_empty() {
            return;
        }
        let pooled =
            pool_layers(&views, &selection, &pools, &case.combine, None, execution).unwrap();
        let row_size = tokens * hidden;
        let copied: Vec<Vec<f64>> = stored
            .iter()
            .map(|layer| {
                spans
                    .iter()
                    .flat_map(|&[row, _, _]| {
                        let row = row as usize;
                        layer[row * row_size..(row + 1) * row_size]
                            .iter()
                            .map(|v| v.widen().into())
                    })
                    .collect()
            })
            .collect();
        let masks: Vec<bool> = spans
            .iter()
            .flat_map(|&[row, start, end]| {
                (0..tokens).map(move |token| {
                    case.mask[row as usize * tokens + token]
                        && (start as usize..end as usize).contains(&token)
                })
            })
            .collect();
        let expected = reference(
            &copied,
            [spans.len(), tokens, hidden],
            &masks,
            &pools,
            &case.combine,
            &[],
        );
        assert_eq!(pooled.rows, spans.len());
        assert_eq!(pooled.values.len(), expected.len());
        assert_all_close(&pooled.values, &expected, tolerance);
    }

    fn spans_of(case: &Case) -> impl Strategy<Value = Vec<[i64; 3]>> {
        let [rows, tokens, _] = case.shape;
        let span = (0..rows.max(1) as i64, 0..=tokens as i64, 0..=tokens as i64)
            .prop_map(|(row, a, b)| [row, a.min(b), a.max(b)]);
        prop::collection::vec(span, if rows == 0 { 0..1 } else { 0..12 })
    }

    proptest! {
        #[test]
        fn spans_match_the_reference(
            (case, spans) in case().prop_flat_map(|case| {
                let spans = spans_of(&case);
                (Just(case), spans)
            })
        ) {
            run_spans::<f64>(&case, &spans, |v| v, Execution::Sequential, 1e-12);
            run_spans::<f32>(&case, &spans, |v| v as f32, Execution::Parallel, 1e-5);
            run_spans::<f16>(&case, &spans, f16::from_f64, Execution::Parallel, 1e-5);
            run_spans::<bf16>(&case, &spans, bf16::from_f64, Execution::Sequential, 1e-5);
        }

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
        // Half types fold four tokens at a time (mean, max and mean+max take a direct path;
        // 17 hidden elements cover both the 8-wide body and the tail), float32 and float64
        // one token at a time in place; a NaN in any slot must still propagate.
        let pool_sets: [&[Pool]; 4] = [
            &[Pool::Mean],
            &[Pool::Max],
            &[Pool::WeightedMean],
            &[Pool::Mean, Pool::Max],
        ];
        fn check<T: Element>(one: T, nan: T, pools: &[Pool])
        where
            T::Accumulator: Into<f64>,
        {
            for slot in 0..9 {
                for hidden in [1usize, 17] {
                    let mut values = vec![one; 9 * hidden];
                    values[slot * hidden + hidden - 1] = nan;
                    let out = pool_one_layer(
                        &values,
                        [1, 9, hidden],
                        &[1; 9],
                        pools,
                        Execution::Sequential,
                    );
                    for chunk in out.chunks(hidden) {
                        let chunk: Vec<f64> = chunk.iter().map(|&v| v.into()).collect();
                        let name = T::NAME;
                        assert!(
                            chunk[hidden - 1].is_nan(),
                            "{name} {pools:?} slot {slot}: {chunk:?}"
                        );
                        assert!(
                            chunk[..hidden - 1].iter().all(|v| *v == 1.0),
                            "{name} {pools:?}: {chunk:?}"
                        );
                    }
                }
            }
        }
        for pools in pool_sets {
            check(f16::from_f32(1.0), f16::NAN, pools);
            check(bf16::from_f32(1.0), bf16::NAN, pools);
            check(1.0f32, f32::NAN, pools);
            check(1.0f64, f64::NAN, pools);
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
