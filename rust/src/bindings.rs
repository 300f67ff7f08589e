//! Python bindings (`hiddenpool._native`): accept numpy arrays, validate them, dispatch on
//! element type, release the GIL around the work and turn every failure into a Python
//! exception. The arithmetic lives in `kernels`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PySequence};

use crate::kernels::{
    bytes_to_read, first_token_positions, pool_layers, Combine, Element, Execution, KernelError,
    LayerView, MaskElement, Pool, TokenId, TokenSelection,
};

/// Work below this many bytes of reads runs on the calling thread with the GIL held:
/// releasing the GIL would cost more than the work.
const RELEASE_GIL_BYTES: usize = 256 * 1024;

/// Work from this many bytes up is spread over the worker pool. Below it, waking the
/// workers (tens of microseconds when they sleep) costs more than a second core saves:
/// measured crossover between 1.7 and 3.4 MB of reads on the 2-core development machine.
const PARALLEL_BYTES: usize = 2 * 1024 * 1024;

impl From<KernelError> for PyErr {
    /// Every kernel error is a bad argument, and its text names it.
    fn from(error: KernelError) -> PyErr {
        PyValueError::new_err(error.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float32,
    Float64,
    Float16,
    BFloat16,
    Bool,
    Int8,
    UInt8,
    Int32,
    Int64,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Float32 => "float32",
            Kind::Float64 => "float64",
            Kind::Float16 => "float16",
            Kind::BFloat16 => "bfloat16",
            Kind::Bool => "bool",
            Kind::Int8 => "int8",
            Kind::UInt8 => "uint8",
            Kind::Int32 => "int32",
            Kind::Int64 => "int64",
        }
    }
}

/// A numpy array's memory, in place when it is aligned, native-endian and strided in whole
/// elements; otherwise a C-ordered native copy made once. Views borrow from it.
struct ArrayMemory<'py> {
    /// Keeps the array (or its copy) alive while views borrow its memory.
    _owner: Bound<'py, PyUntypedArray>,
    kind: Kind,
    /// Bytes per element.
    itemsize: usize,
    lowest: *const u8,
    /// Elements from `lowest` to the highest addressed element, inclusive.
    span: usize,
    /// Element index of `[0, 0, ...]` counted from `lowest`.
    origin: usize,
    shape: Vec<usize>,
    strides: Vec<isize>,
}

impl<'py> ArrayMemory<'py> {
    /// `allowed` lists the element kinds this argument takes; `bfloat16_view` says a 16-bit
    /// integer array holds bfloat16 bits (how torch's bfloat16 crosses into numpy).
    fn borrow(
        argument: &str,
        object: &Bound<'py, PyAny>,
        ndim: usize,
        allowed: &[Kind],
        bfloat16_view: bool,
    ) -> PyResult<Self> {
        let array = object.cast::<PyUntypedArray>().map_err(|_| {
            let type_name = object
                .get_type()
                .name()
                .map(|name| name.to_string())
                .unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!(
                "{argument}: expected a numpy.ndarray, got {type_name}"
            ))
        })?;
        if array.ndim() != ndim {
            return Err(PyValueError::new_err(format!(
                "{argument}: expected {ndim} dimensions, got shape {:?}",
                array.shape()
            )));
        }
        let dtype = array.dtype();
        // Only extension dtypes (ml_dtypes' bfloat16) need their name looked up.
        let dtype_name: String = if matches!(dtype.kind(), b'f' | b'i' | b'u' | b'b') {
            String::new()
        } else {
            dtype.getattr("name")?.extract()?
        };
        let kind = match (dtype.kind(), dtype.itemsize(), dtype_name.as_str()) {
            (_, 2, "bfloat16") => Some(Kind::BFloat16),
            (b'u' | b'i', 2, _) if bfloat16_view => Some(Kind::BFloat16),
            (b'f', 4, _) => Some(Kind::Float32),
            (b'f', 8, _) => Some(Kind::Float64),
            (b'f', 2, _) => Some(Kind::Float16),
            (b'b', 1, _) => Some(Kind::Bool),
            (b'i', 1, _) => Some(Kind::Int8),
            (b'u', 1, _) => Some(Kind::UInt8),
            (b'i', 4, _) => Some(Kind::Int32),
            (b'i', 8, _) => Some(Kind::Int64),
            _ => None,
        }
        .filter(|kind| allowed.contains(kind))
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|kind| kind.name()).collect();
            let dtype_text = dtype.str().map(|text| text.to_string()).unwrap_or_default();
            PyTypeError::new_err(format!(
                "{argument}: unsupported dtype {dtype_text} with shape {:?}; expected one of {}",
                array.shape(),
                names.join(", ")
            ))
        })?;
        let itemsize = dtype.itemsize();
        let in_place = array.is_aligned()
            && dtype.is_native_byteorder() != Some(false)
            && array
                .strides()
                .iter()
                .all(|stride| stride % itemsize as isize == 0);
        let owner = if in_place {
            array.clone()
        } else {
            let native = dtype.call_method1("newbyteorder", ("=",))?;
            let kwargs = PyDict::new(object.py());
            kwargs.set_item("order", "C")?;
            array
                .call_method("astype", (native,), Some(&kwargs))?
                .cast_into::<PyUntypedArray>()?
        };
        let shape = owner.shape().to_vec();
        let strides: Vec<isize> = owner
            .strides()
            .iter()
            .map(|stride| stride / itemsize as isize)
            .collect();
        // SAFETY: the object is a live ndarray; `data` is its first element's address.
        let data = unsafe { (*owner.as_array_ptr()).data } as *const u8;
        let (lowest_offset, span) = if shape.contains(&0) {
            (0isize, 0usize)
        } else {
            let mut low = 0isize;
            let mut high = 0isize;
            for (&extent, &stride) in shape.iter().zip(&strides) {
                let reach = (extent as isize - 1) * stride;
                if reach < 0 {
                    low += reach;
                } else {
                    high += reach;
                }
            }
            (low, (high - low) as usize + 1)
        };
        Ok(ArrayMemory {
            _owner: owner,
            kind,
            itemsize,
            // SAFETY: numpy guarantees every element of the array lies within its buffer,
            // and `lowest_offset` is the offset of the lowest-addressed element.
            lowest: unsafe { data.offset(lowest_offset * itemsize as isize) },
            span,
            origin: (-lowest_offset) as usize,
            shape,
            strides,
        })
    }

    /// The addressed memory as elements of `T`.
    ///
    /// # Safety
    /// Every bit pattern of `kind`'s size must be a valid `T`: read numpy bools as `u8`
    /// (numpy stores any byte in a bool array, e.g. through `.view(np.bool_)`, and a Rust
    /// `bool` that is not 0 or 1 is undefined behaviour), bfloat16 as `bf16` or `u16`.
    /// The element size is asserted; the rest is the caller's promise.
    unsafe fn slice<T>(&self) -> &[T] {
        assert_eq!(
            std::mem::size_of::<T>(),
            self.itemsize,
            "slice::<{}> over {}-byte {} elements",
            std::any::type_name::<T>(),
            self.itemsize,
            self.kind.name()
        );
        if self.span == 0 {
            return &[];
        }
        debug_assert_eq!(self.lowest as usize % std::mem::align_of::<T>(), 0);
        // SAFETY: `borrow` checked alignment, native byte order and whole-element strides;
        // the size of `T` equals the element size (asserted above) and the caller promises
        // every bit pattern is a valid `T`; `span` covers exactly the elements the array
        // addresses, and the owner keeps the memory alive for the borrow's lifetime.
        //
        // Concurrent writes: numpy has no borrow checker, so while the GIL is released
        // around a kernel (and at any time on a free-threaded build) another Python thread
        // may write this array. Those writes race with our reads. What keeps that from
        // becoming memory unsafety: every element type read here accepts any bit pattern
        // (no `bool`, no enum), and no address is computed from array contents after
        // validation: masks, offsets and indices are turned into positions and checked
        // while the GIL is held, before the kernel starts; hidden states are only ever
        // read as values. A racing writer can therefore change the numbers pooled (as with
        // numpy's own GIL-free ufuncs), never the memory read. Callers who write an array
        // from another thread during a call get values from before or after the write.
        unsafe { std::slice::from_raw_parts(self.lowest as *const T, self.span) }
    }

    fn shape2(&self) -> [usize; 2] {
        [self.shape[0], self.shape[1]]
    }
    fn strides2(&self) -> [isize; 2] {
        [self.strides[0], self.strides[1]]
    }

    /// A 1-d integer array (int32 or int64) as i64 values.
    fn to_i64_vec(&self) -> Vec<i64> {
        let read = |index: usize| -> i64 {
            let position = (self.origin as isize + index as isize * self.strides[0]) as usize;
            // SAFETY: `borrow` admitted only int32 and int64 here (ID_KINDS); every bit
            // pattern is a valid integer.
            match self.kind {
                Kind::Int32 => i64::from(unsafe { self.slice::<i32>() }[position]),
                _ => (unsafe { self.slice::<i64>() })[position],
            }
        };
        (0..self.shape[0]).map(read).collect()
    }

    /// A 2-d integer array `[n, 3]` (int32 or int64) as rows of i64 values.
    fn to_i64_triples(&self, argument: &str) -> PyResult<Vec<[i64; 3]>> {
        if self.shape[1] != 3 {
            return Err(PyValueError::new_err(format!(
                "{argument}: expected shape [S, 3] (row, start, end), got {:?}",
                self.shape
            )));
        }
        let read = |row: usize, column: usize| -> i64 {
            let position = (self.origin as isize
                + row as isize * self.strides[0]
                + column as isize * self.strides[1]) as usize;
            // SAFETY: `borrow` admitted only int32 and int64 here (ID_KINDS); every bit
            // pattern is a valid integer, and `position` addresses an element of the array.
            match self.kind {
                Kind::Int32 => i64::from(unsafe { self.slice::<i32>() }[position]),
                _ => (unsafe { self.slice::<i64>() })[position],
            }
        };
        Ok((0..self.shape[0])
            .map(|row| [read(row, 0), read(row, 1), read(row, 2)])
            .collect())
    }
}

const FLOAT_KINDS: [Kind; 4] = [Kind::Float32, Kind::Float64, Kind::Float16, Kind::BFloat16];
const MASK_KINDS: [Kind; 7] = [
    Kind::Bool,
    Kind::Int8,
    Kind::UInt8,
    Kind::Int32,
    Kind::Int64,
    Kind::Float32,
    Kind::Float64,
];
const ID_KINDS: [Kind; 2] = [Kind::Int32, Kind::Int64];

fn borrow_layers<'py>(
    hidden_states: &Bound<'py, PyAny>,
    ndim: usize,
    bfloat16_view: bool,
) -> PyResult<Vec<ArrayMemory<'py>>> {
    let sequence = hidden_states.cast::<PySequence>().map_err(|_| {
        PyTypeError::new_err("hidden_states: expected a sequence of numpy arrays (one per layer)")
    })?;
    let count = sequence.len()?;
    if count == 0 {
        return Err(PyValueError::new_err(
            "hidden_states: needs at least one layer, got none",
        ));
    }
    let mut layers = Vec::with_capacity(count);
    for index in 0..count {
        let name = if count == 1 {
            "hidden_states".to_string()
        } else {
            format!("hidden_states[{index}]")
        };
        let item = sequence.get_item(index)?;
        layers.push(ArrayMemory::borrow(
            &name,
            &item,
            ndim,
            &FLOAT_KINDS,
            bfloat16_view,
        )?);
    }
    let first_kind = layers[0].kind;
    if let Some((index, other)) = layers
        .iter()
        .enumerate()
        .find(|(_, layer)| layer.kind != first_kind)
    {
        return Err(PyTypeError::new_err(format!(
            "hidden_states: layer {index} is {} but layer 0 is {}; all layers must share one dtype",
            other.kind.name(),
            first_kind.name()
        )));
    }
    if let Some((index, other)) = layers
        .iter()
        .enumerate()
        .find(|(_, layer)| layer.shape != layers[0].shape)
    {
        return Err(PyValueError::new_err(format!(
            "hidden_states: layer {index} has shape {:?} but layer 0 has {:?}",
            other.shape, layers[0].shape
        )));
    }
    Ok(layers)
}

fn selection_from_mask(mask: &ArrayMemory<'_>) -> Result<TokenSelection, KernelError> {
    /// # Safety
    /// `M` has `mask.kind`'s size, and every bit pattern of it is a valid `M`.
    unsafe fn build<M: MaskElement>(mask: &ArrayMemory<'_>) -> Result<TokenSelection, KernelError> {
        TokenSelection::from_mask(
            // SAFETY: forwarded from this function's contract.
            unsafe { mask.slice::<M>() },
            mask.origin,
            mask.shape2(),
            mask.strides2(),
        )
    }
    // SAFETY: each arm reads the kind as a type of its size that accepts every bit pattern.
    // numpy bools are read as bytes: nonzero is a real token, as numpy's own truth test says
    // (a byte 2 seen through `.view(np.bool_)` prints as True).
    unsafe {
        match mask.kind {
            Kind::Bool | Kind::UInt8 => build::<u8>(mask),
            Kind::Int8 => build::<i8>(mask),
            Kind::Int32 => build::<i32>(mask),
            Kind::Int64 => build::<i64>(mask),
            Kind::Float32 => build::<f32>(mask),
            Kind::Float64 => build::<f64>(mask),
            Kind::Float16 | Kind::BFloat16 => {
                unreachable!("masks of half types are refused in borrow")
            }
        }
    }
}

fn parse_request(
    pools: Vec<String>,
    combine: &str,
    layer_weights: Option<Vec<f64>>,
) -> PyResult<(Vec<Pool>, Combine)> {
    let pools = pools
        .iter()
        .map(|name| {
            Pool::parse(name).ok_or_else(|| {
                let valid: Vec<&str> = Pool::ALL.iter().map(|pool| pool.name()).collect();
                PyValueError::new_err(format!(
                    "pools: unknown pool {name:?}; valid: {}",
                    valid.join(", ")
                ))
            })
        })
        .collect::<PyResult<Vec<Pool>>>()?;
    let combine = match (combine, layer_weights) {
        ("weighted", Some(weights)) => Combine::Weighted(weights),
        ("weighted", None) => {
            return Err(PyValueError::new_err(
                "layer_weights: combine 'weighted' needs one weight per layer",
            ))
        }
        (_, Some(_)) => {
            return Err(PyValueError::new_err(
                "layer_weights: given, but combine is not 'weighted'",
            ))
        }
        ("sum", None) => Combine::Sum,
        ("mean", None) => Combine::Mean,
        ("concat", None) => Combine::Concat,
        (other, None) => {
            return Err(PyValueError::new_err(format!(
                "combine: unknown combine {other:?}; valid: sum, mean, concat, weighted"
            )))
        }
    };
    Ok((pools, combine))
}

// Thread pool: sized by set_num_threads, else HIDDENPOOL_NUM_THREADS, else every core. It is
// rebuilt in a forked child, whose copy of the parent's pool has no threads behind it.
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);
static THREAD_POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

fn configured_threads() -> PyResult<usize> {
    let requested = REQUESTED_THREADS.load(Ordering::Relaxed);
    if requested > 0 {
        return Ok(requested);
    }
    match std::env::var("HIDDENPOOL_NUM_THREADS") {
        Ok(text) if !text.trim().is_empty() => match text.trim().parse::<usize>() {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(PyValueError::new_err(format!(
                "HIDDENPOOL_NUM_THREADS: expected a positive integer, got {text:?}"
            ))),
        },
        _ => Ok(std::thread::available_parallelism().map_or(1, |count| count.get())),
    }
}

fn thread_pool() -> PyResult<Arc<rayon::ThreadPool>> {
    let mut slot = THREAD_POOL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let process = std::process::id();
    let threads = configured_threads()?;
    if let Some((owner, pool)) = slot.as_ref() {
        if *owner == process && pool.current_num_threads() == threads {
            return Ok(pool.clone());
        }
    }
    if let Some((owner, stale)) = slot.take() {
        if owner != process {
            // Dropping it would signal worker threads that do not exist in this process.
            std::mem::forget(stale);
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("hiddenpool-{index}"))
        .build()
        .map_err(|error| {
            PyRuntimeError::new_err(format!("could not start worker threads: {error}"))
        })?;
    let pool = Arc::new(pool);
    *slot = Some((process, pool.clone()));
    Ok(pool)
}

/// Runs `work` here with the GIL held when `bytes` is small, here with the GIL released
/// when moderate, and on the worker pool with the GIL released when large.
fn run<R: Send>(
    py: Python<'_>,
    bytes: usize,
    work: impl FnOnce(Execution) -> Result<R, KernelError> + Send,
) -> PyResult<R> {
    let outcome = if bytes < RELEASE_GIL_BYTES {
        catch_unwind(AssertUnwindSafe(|| work(Execution::Sequential)))
    } else if bytes < PARALLEL_BYTES {
        py.detach(|| catch_unwind(AssertUnwindSafe(|| work(Execution::Sequential))))
    } else {
        let pool = thread_pool()?;
        py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| work(Execution::Parallel))
            }))
        })
    };
    match outcome {
        Ok(result) => Ok(result?),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "hiddenpool internal error (please report): {message}"
            )))
        }
    }
}

struct Request<'a> {
    pools: &'a [Pool],
    combine: &'a Combine,
    index: Option<&'a [i64]>,
}

/// The validated, owned form of a call's pool, combine and index arguments.
struct ParsedRequest {
    pools: Vec<Pool>,
    combine: Combine,
    index: Option<Vec<i64>>,
}

impl ParsedRequest {
    fn parse(
        pools: Vec<String>,
        combine: &str,
        layer_weights: Option<Vec<f64>>,
        index: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (pools, combine) = parse_request(pools, combine, layer_weights)?;
        Ok(ParsedRequest {
            pools,
            combine,
            index: borrow_index(index)?,
        })
    }

    fn borrowed(&self) -> Request<'_> {
        Request {
            pools: &self.pools,
            combine: &self.combine,
            index: self.index.as_deref(),
        }
    }
}

/// # Safety
/// `T` is the element type of every layer (`dispatch` matches it to their shared kind).
unsafe fn pool_typed<'py, T: Element>(
    py: Python<'py>,
    layers: &[ArrayMemory<'py>],
    selection: &TokenSelection,
    packed_rows: Option<usize>,
    request: &Request<'_>,
) -> PyResult<Bound<'py, PyAny>>
where
    T::Accumulator: numpy::Element,
{
    // SAFETY: `T` is the layers' element type (this function's contract); the four float
    // types accept every bit pattern.
    let views = layers
        .iter()
        .map(|layer| match packed_rows {
            None => LayerView::new(
                unsafe { layer.slice::<T>() },
                layer.origin,
                [layer.shape[0], layer.shape[1], layer.shape[2]],
                [layer.strides[0], layer.strides[1], layer.strides[2]],
            ),
            Some(rows) => LayerView::packed(
                unsafe { layer.slice::<T>() },
                layer.origin,
                rows,
                layer.shape2(),
                layer.strides2(),
            ),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hidden = layers[0].shape.last().copied().unwrap_or(0);
    let bytes = bytes_to_read(
        selection,
        request.pools,
        layers.len(),
        hidden * std::mem::size_of::<T>(),
    );
    let pooled = run(py, bytes, |execution| {
        pool_layers(
            &views,
            selection,
            request.pools,
            request.combine,
            request.index,
            execution,
        )
    })?;
    Ok(PyArray1::from_vec(py, pooled.values)
        .reshape([pooled.rows, pooled.width])?
        .into_any())
}

fn dispatch<'py>(
    py: Python<'py>,
    layers: &[ArrayMemory<'py>],
    selection: &TokenSelection,
    packed_rows: Option<usize>,
    request: &Request<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `borrow_layers` made every layer share layers[0]'s kind, matched here.
    unsafe {
        match layers[0].kind {
            Kind::Float32 => pool_typed::<f32>(py, layers, selection, packed_rows, request),
            Kind::Float64 => pool_typed::<f64>(py, layers, selection, packed_rows, request),
            Kind::Float16 => pool_typed::<f16>(py, layers, selection, packed_rows, request),
            Kind::BFloat16 => pool_typed::<bf16>(py, layers, selection, packed_rows, request),
            other => unreachable!("layers of kind {other:?} are refused in borrow"),
        }
    }
}

fn borrow_index(index: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<i64>>> {
    index
        .map(|index| {
            ArrayMemory::borrow("index", index, 1, &ID_KINDS, false)
                .map(|memory| memory.to_i64_vec())
        })
        .transpose()
}

/// The `[B, T]` mask of padded layers `[B, T, H]`, its shape checked against theirs.
fn borrow_mask<'py>(
    attention_mask: &Bound<'py, PyAny>,
    layers: &[ArrayMemory<'py>],
) -> PyResult<ArrayMemory<'py>> {
    let mask = ArrayMemory::borrow("attention_mask", attention_mask, 2, &MASK_KINDS, false)?;
    let [rows, tokens] = [layers[0].shape[0], layers[0].shape[1]];
    if mask.shape2() != [rows, tokens] {
        return Err(PyValueError::new_err(format!(
            "attention_mask: shape {:?} does not match hidden_states shape {:?} (expected [{rows}, {tokens}])",
            mask.shape, layers[0].shape
        )));
    }
    Ok(mask)
}

/// Pools padded hidden states `[B, T, H]` (one array per layer) over the real tokens of
/// `attention_mask` `[B, T]`. Returns `[B, D]`, float32 (float64 for float64 input).
#[pyfunction]
#[pyo3(signature = (hidden_states, attention_mask, pools, combine="sum", layer_weights=None, index=None, bfloat16=false))]
#[allow(clippy::too_many_arguments)]
fn pool<'py>(
    py: Python<'py>,
    hidden_states: &Bound<'py, PyAny>,
    attention_mask: &Bound<'py, PyAny>,
    pools: Vec<String>,
    combine: &str,
    layer_weights: Option<Vec<f64>>,
    index: Option<&Bound<'py, PyAny>>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let layers = borrow_layers(hidden_states, 3, bfloat16)?;
    let mask = borrow_mask(attention_mask, &layers)?;
    let [rows, tokens] = mask.shape2();
    let request = ParsedRequest::parse(pools, combine, layer_weights, index)?;
    let selection = if request.pools.iter().all(|&pool| pool == Pool::Index) {
        TokenSelection::positions_only(rows, tokens)
    } else {
        selection_from_mask(&mask)?
    };
    dispatch(py, &layers, &selection, None, &request.borrowed())
}

/// Pools packed hidden states `[N, H]` (one array per layer) whose rows are delimited by
/// `offsets` `[B + 1]` (cu_seqlens). Returns `[B, D]`.
#[pyfunction]
#[pyo3(signature = (hidden_states, offsets, pools, combine="sum", layer_weights=None, index=None, bfloat16=false))]
#[allow(clippy::too_many_arguments)]
fn pool_packed<'py>(
    py: Python<'py>,
    hidden_states: &Bound<'py, PyAny>,
    offsets: &Bound<'py, PyAny>,
    pools: Vec<String>,
    combine: &str,
    layer_weights: Option<Vec<f64>>,
    index: Option<&Bound<'py, PyAny>>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let layers = borrow_layers(hidden_states, 2, bfloat16)?;
    let offsets = ArrayMemory::borrow("offsets", offsets, 1, &ID_KINDS, false)?.to_i64_vec();
    let selection = TokenSelection::from_offsets(&offsets, layers[0].shape[0])?;
    let request = ParsedRequest::parse(pools, combine, layer_weights, index)?;
    dispatch(
        py,
        &layers,
        &selection,
        Some(selection.rows()),
        &request.borrowed(),
    )
}

/// Pools spans of tokens: `spans` `[S, 3]` holds `(row, start, end)` token positions (end
/// exclusive) of padded hidden states `[B, T, H]` under `attention_mask` `[B, T]`, or of
/// packed ones `[N, H]` under `offsets` `[B + 1]` (positions then count from each row's
/// first token). Only real tokens inside a span are read. Returns `[S, D]`.
#[pyfunction]
#[pyo3(signature = (hidden_states, spans, pools, combine="sum", layer_weights=None, attention_mask=None, offsets=None, bfloat16=false))]
#[allow(clippy::too_many_arguments)]
fn pool_spans<'py>(
    py: Python<'py>,
    hidden_states: &Bound<'py, PyAny>,
    spans: &Bound<'py, PyAny>,
    pools: Vec<String>,
    combine: &str,
    layer_weights: Option<Vec<f64>>,
    attention_mask: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    bfloat16: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let request = ParsedRequest::parse(pools, combine, layer_weights, None)?;
    if request.pools.contains(&Pool::Index) {
        return Err(PyValueError::new_err(
            "pools: the index pool gathers one position per row; within spans pool first or last",
        ));
    }
    let spans =
        ArrayMemory::borrow("spans", spans, 2, &ID_KINDS, false)?.to_i64_triples("spans")?;
    let (layers, base, packed_rows) = match (attention_mask, offsets) {
        (Some(mask), None) => {
            let layers = borrow_layers(hidden_states, 3, bfloat16)?;
            let selection = selection_from_mask(&borrow_mask(mask, &layers)?)?;
            (layers, selection, None)
        }
        (None, Some(offsets)) => {
            let layers = borrow_layers(hidden_states, 2, bfloat16)?;
            let offsets =
                ArrayMemory::borrow("offsets", offsets, 1, &ID_KINDS, false)?.to_i64_vec();
            let selection = TokenSelection::from_offsets(&offsets, layers[0].shape[0])?;
            let rows = selection.rows();
            (layers, selection, Some(rows))
        }
        _ => {
            return Err(PyValueError::new_err(
                "attention_mask: give exactly one of attention_mask (padded [B, T, H] input) and offsets (packed [N, H] input)",
            ))
        }
    };
    let selection = base.spans(&spans)?;
    dispatch(py, &layers, &selection, packed_rows, &request.borrowed())
}

/// For each row, the position of the first real token whose id is `token_id`; -1 where a
/// row has none.
#[pyfunction]
fn find_token<'py>(
    py: Python<'py>,
    input_ids: &Bound<'py, PyAny>,
    attention_mask: &Bound<'py, PyAny>,
    token_id: i64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let ids = ArrayMemory::borrow("input_ids", input_ids, 2, &ID_KINDS, false)?;
    let mask = ArrayMemory::borrow("attention_mask", attention_mask, 2, &MASK_KINDS, false)?;
    if ids.shape != mask.shape {
        return Err(PyValueError::new_err(format!(
            "input_ids: shape {:?} does not match attention_mask shape {:?}",
            ids.shape, mask.shape
        )));
    }
    let selection = selection_from_mask(&mask)?;
    /// # Safety
    /// `I` is the element type of `ids`.
    unsafe fn find<I: TokenId>(
        ids: &ArrayMemory<'_>,
        selection: &TokenSelection,
        token_id: i64,
    ) -> Result<Vec<i64>, KernelError> {
        first_token_positions(
            // SAFETY: forwarded from this function's contract; integers accept every bit
            // pattern.
            unsafe { ids.slice::<I>() },
            ids.origin,
            ids.shape2(),
            ids.strides2(),
            selection,
            token_id,
        )
    }
    // SAFETY: `borrow` admitted only int32 and int64 ids (ID_KINDS), matched here.
    let positions = unsafe {
        match ids.kind {
            Kind::Int32 => find::<i32>(&ids, &selection, token_id),
            _ => find::<i64>(&ids, &selection, token_id),
        }
    }?;
    Ok(PyArray1::from_vec(py, positions))
}

/// Panics inside the same guarded runner the kernels use, on the calling thread or on the
/// worker pool: proves that a Rust panic reaches Python as an exception (tests only).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, on_workers: bool) -> PyResult<()> {
    let bytes = if on_workers { PARALLEL_BYTES } else { 0 };
    run(py, bytes, |_| -> Result<(), KernelError> {
        panic!("deliberate panic for a test")
    })
}

/// Sets the number of worker threads for large inputs (default: every core).
#[pyfunction]
fn set_num_threads(count: i64) -> PyResult<()> {
    if count < 1 {
        return Err(PyValueError::new_err(format!(
            "count: expected a positive integer, got {count}"
        )));
    }
    REQUESTED_THREADS.store(count as usize, Ordering::Relaxed);
    Ok(())
}

/// The number of worker threads large inputs are spread over.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    configured_threads()
}

#[pymodule(gil_used = false)]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(pool, module)?)?;
    module.add_function(wrap_pyfunction!(pool_packed, module)?)?;
    module.add_function(wrap_pyfunction!(pool_spans, module)?)?;
    module.add_function(wrap_pyfunction!(find_token, module)?)?;
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(_panic_for_tests, module)?)?;
    module.add(
        "POOLS",
        Pool::ALL.iter().map(|pool| pool.name()).collect::<Vec<_>>(),
    )?;
    Ok(())
}
