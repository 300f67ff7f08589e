//! Strided views over hidden states, in either layout.
//!
//! A view addresses element (row, token, hidden) at
//! `origin + row * row_stride + token * token_stride + hidden * hidden_stride` inside a
//! slice. Strides count elements and may be negative or zero. The padded layout `[B, T, H]`
//! uses all three; the packed layout `[N, H]` sets `row_stride` to 0 and addresses tokens
//! by their absolute index in `0..N`.

use super::error::KernelError;

/// Whether every element of an array with this shape and these element strides, starting
/// at `origin`, lies in `0..len`. An array with a zero extent addresses nothing.
pub fn fits_inside(len: usize, origin: usize, shape: &[usize], strides: &[isize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut lowest = origin as i128;
    let mut highest = origin as i128;
    for (extent, stride) in shape.iter().zip(strides) {
        let reach = (*extent as i128 - 1) * *stride as i128;
        if reach < 0 {
            lowest += reach;
        } else {
            highest += reach;
        }
    }
    lowest >= 0 && highest < len as i128
}

#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a, T> {
    data: &'a [T],
    origin: usize,
    rows: usize,
    tokens: usize,
    hidden: usize,
    row_stride: isize,
    token_stride: isize,
    hidden_stride: isize,
}

/// One token's hidden vector (or a chunk of it) within a view.
pub enum TokenSlice<'a, T> {
    Contiguous(&'a [T]),
    Strided {
        data: &'a [T],
        start: usize,
        stride: isize,
        len: usize,
    },
}

impl<'a, T: Copy> LayerView<'a, T> {
    /// A view of shape `[rows, tokens, hidden]`; fails unless every addressed element lies
    /// inside `data`.
    pub fn new(
        data: &'a [T],
        origin: usize,
        shape: [usize; 3],
        strides: [isize; 3],
    ) -> Result<Self, KernelError> {
        let [rows, tokens, hidden] = shape;
        let view = LayerView {
            data,
            origin,
            rows,
            tokens,
            hidden,
            row_stride: strides[0],
            token_stride: strides[1],
            hidden_stride: strides[2],
        };
        if !fits_inside(data.len(), origin, &shape, &strides) {
            return Err(KernelError::invalid(
                "hidden_states",
                format!(
                    "shape {shape:?} with strides {strides:?} from offset {origin} reaches outside a buffer of {} elements",
                    data.len()
                ),
            ));
        }
        Ok(view)
    }

    /// A contiguous `[rows, tokens, hidden]` array.
    pub fn contiguous(data: &'a [T], shape: [usize; 3]) -> Result<Self, KernelError> {
        let [_, tokens, hidden] = shape;
        let strides = [(tokens * hidden) as isize, hidden as isize, 1];
        Self::new(data, 0, shape, strides)
    }

    /// A packed `[tokens, hidden]` array shared by `rows` sequences.
    pub fn packed(
        data: &'a [T],
        origin: usize,
        rows: usize,
        shape: [usize; 2],
        strides: [isize; 2],
    ) -> Result<Self, KernelError> {
        let mut view = Self::new(
            data,
            origin,
            [1, shape[0], shape[1]],
            [0, strides[0], strides[1]],
        )?;
        view.rows = rows;
        Ok(view)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Hidden elements `start..start + len` of one token. Callers keep the indices in range.
    pub fn token(&self, row: usize, token: usize, start: usize, len: usize) -> TokenSlice<'a, T> {
        debug_assert!(row < self.rows && token < self.tokens && start + len <= self.hidden);
        let first = self.origin as isize
            + row as isize * self.row_stride
            + token as isize * self.token_stride
            + start as isize * self.hidden_stride;
        let first = first as usize;
        if self.hidden_stride == 1 || len <= 1 {
            TokenSlice::Contiguous(&self.data[first..first + len])
        } else {
            TokenSlice::Strided {
                data: self.data,
                start: first,
                stride: self.hidden_stride,
                len,
            }
        }
    }
}
