//! Which tokens of each row are real, as explicit positions.
//!
//! Both layouts reduce to this: for the padded layout the positions are the nonzero mask
//! entries of a row (in order, holes allowed); for the packed layout they are the row's
//! range of absolute token indices. The kernels then touch real tokens only.

use super::element::MaskElement;
use super::error::KernelError;
use super::view::fits_inside;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSelection {
    /// `row_starts[b]..row_starts[b + 1]` indexes `positions` for row b.
    row_starts: Vec<usize>,
    positions: Vec<usize>,
    /// Positions are below this bound (T, or N for packed rows).
    token_bound: usize,
    /// Packed rows address tokens absolutely; gather indices count from the row's start.
    packed: bool,
    /// For span selections (`spans`): the hidden-state row each selection row reads, and
    /// how many rows the hidden states have. None: selection row b reads row b.
    sources: Option<(Vec<usize>, usize)>,
}

impl TokenSelection {
    /// From a `[rows, tokens]` mask read through element strides.
    pub fn from_mask<M: MaskElement>(
        mask: &[M],
        origin: usize,
        shape: [usize; 2],
        strides: [isize; 2],
    ) -> Result<Self, KernelError> {
        let [rows, tokens] = shape;
        if !fits_inside(mask.len(), origin, &shape, &strides) {
            return Err(KernelError::invalid(
                "attention_mask",
                format!(
                    "shape {shape:?} with strides {strides:?} reaches outside a buffer of {} elements",
                    mask.len()
                ),
            ));
        }
        let mut row_starts = Vec::with_capacity(rows + 1);
        // Branch-free compaction: every position is written, and the length advances only
        // past real ones. A `push` per real token mispredicts on ragged masks; this is what
        // keeps the gathering pools (first, last, eos) cheaper than torch.gather.
        let mut positions = vec![0usize; rows * tokens];
        let mut kept = 0;
        row_starts.push(0);
        for row in 0..rows {
            let row_origin = origin as isize + row as isize * strides[0];
            for token in 0..tokens {
                let index = (row_origin + token as isize * strides[1]) as usize;
                positions[kept] = token;
                kept += usize::from(mask[index].is_real());
            }
            row_starts.push(kept);
        }
        positions.truncate(kept);
        Ok(TokenSelection {
            row_starts,
            positions,
            token_bound: tokens,
            packed: false,
            sources: None,
        })
    }

    /// From a contiguous `[rows, tokens]` mask.
    pub fn from_contiguous_mask<M: MaskElement>(
        mask: &[M],
        rows: usize,
        tokens: usize,
    ) -> Result<Self, KernelError> {
        if mask.len() != rows * tokens {
            return Err(KernelError::invalid(
                "attention_mask",
                format!(
                    "expected {} elements for shape [{rows}, {tokens}], got {}",
                    rows * tokens,
                    mask.len()
                ),
            ));
        }
        Self::from_mask(mask, 0, [rows, tokens], [tokens as isize, 1])
    }

    /// `rows` rows of `tokens` positions with no real token listed: for calls whose every
    /// pool gathers at explicit positions (`Pool::Index`), which read no mask, so building
    /// the real-token list would be wasted work (it is most of the cost of an `eos` call).
    pub fn positions_only(rows: usize, tokens: usize) -> Self {
        TokenSelection {
            row_starts: vec![0; rows + 1],
            positions: Vec::new(),
            token_bound: tokens,
            packed: false,
            sources: None,
        }
    }

    /// From cu_seqlens-style offsets `[B + 1]` over `total_tokens` packed tokens: must start
    /// at 0, never decrease, and end at `total_tokens`.
    pub fn from_offsets(offsets: &[i64], total_tokens: usize) -> Result<Self, KernelError> {
        if offsets.is_empty() {
            return Err(KernelError::invalid(
                "offsets",
                "needs at least one entry (B + 1 entries for B rows, starting with 0)",
            ));
        }
        if offsets[0] != 0 {
            return Err(KernelError::invalid(
                "offsets",
                format!("must start at 0, starts at {}", offsets[0]),
            ));
        }
        for (index, pair) in offsets.windows(2).enumerate() {
            if pair[1] < pair[0] {
                return Err(KernelError::invalid(
                    "offsets",
                    format!(
                        "must not decrease, but offsets[{}] = {} > offsets[{}] = {}",
                        index,
                        pair[0],
                        index + 1,
                        pair[1]
                    ),
                ));
            }
        }
        let last = *offsets.last().unwrap_or(&0);
        if last != total_tokens as i64 {
            return Err(KernelError::invalid(
                "offsets",
                format!("must end at the number of packed tokens {total_tokens}, ends at {last}"),
            ));
        }
        let row_starts: Vec<usize> = offsets.iter().map(|&o| o as usize).collect();
        Ok(TokenSelection {
            row_starts,
            positions: (0..total_tokens).collect(),
            token_bound: total_tokens,
            packed: true,
            sources: None,
        })
    }

    /// One row per span `(row, start, end)`: the real tokens of `row` at positions
    /// `start..end` (end exclusive; positions count padding too, and for packed rows they
    /// count from the row's first token). Spans may overlap and share rows; a span with no
    /// real token is an empty row. The spans' rows read the hidden states of their `row`
    /// (`source`), so many spans cost one pass over their own tokens, not over whole rows.
    pub fn spans(&self, spans: &[[i64; 3]]) -> Result<Self, KernelError> {
        if self.sources.is_some() {
            return Err(KernelError::invalid(
                "spans",
                "spans of a span selection are not supported",
            ));
        }
        let rows = self.rows();
        let mut row_starts = Vec::with_capacity(spans.len() + 1);
        let mut sources = Vec::with_capacity(spans.len());
        let mut positions = Vec::new();
        row_starts.push(0);
        for (index, &[row, start, end]) in spans.iter().enumerate() {
            if row < 0 || row as u64 >= rows as u64 {
                return Err(KernelError::invalid(
                    "spans",
                    format!(
                        "spans[{index}] = ({row}, {start}, {end}): row {row} is outside 0..{rows}"
                    ),
                ));
            }
            let row = row as usize;
            let (base, limit) = if self.packed {
                (
                    self.row_starts[row],
                    self.row_starts[row + 1] - self.row_starts[row],
                )
            } else {
                (0, self.token_bound)
            };
            if start < 0 || end < start || end as u64 > limit as u64 {
                return Err(KernelError::invalid(
                    "spans",
                    format!(
                        "spans[{index}] = ({row}, {start}, {end}): needs 0 <= start <= end <= {limit} (the row's token positions)"
                    ),
                ));
            }
            // A row's positions are in increasing order: the span is a contiguous run of them.
            let real = self.row(row);
            let low = real.partition_point(|&position| position < base + start as usize);
            let high = real.partition_point(|&position| position < base + end as usize);
            positions.extend_from_slice(&real[low..high]);
            row_starts.push(positions.len());
            sources.push(row);
        }
        Ok(TokenSelection {
            row_starts,
            positions,
            token_bound: self.token_bound,
            packed: self.packed,
            sources: Some((sources, rows)),
        })
    }

    /// The hidden-state row that selection row `row` reads.
    pub fn source(&self, row: usize) -> usize {
        match &self.sources {
            Some((sources, _)) => sources[row],
            None => row,
        }
    }

    /// How many hidden-state rows this selection reads from (its own rows unless it holds
    /// spans).
    pub fn source_rows(&self) -> usize {
        match &self.sources {
            Some((_, rows)) => *rows,
            None => self.rows(),
        }
    }

    pub fn rows(&self) -> usize {
        self.row_starts.len() - 1
    }

    pub fn token_bound(&self) -> usize {
        self.token_bound
    }

    /// The real token positions of a row, in order.
    pub fn row(&self, row: usize) -> &[usize] {
        &self.positions[self.row_starts[row]..self.row_starts[row + 1]]
    }

    /// Real tokens per row.
    pub fn counts(&self) -> Vec<usize> {
        self.row_starts
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .collect()
    }

    /// Turns per-row gather indices into token positions of the view: -1 means "no token"
    /// (the row pools to zeros); a padded row takes any position in `0..T` (the caller asked
    /// for it explicitly), a packed row a position inside its own range.
    pub fn resolve_gather(&self, index: &[i64]) -> Result<Vec<Option<usize>>, KernelError> {
        if self.sources.is_some() {
            return Err(KernelError::invalid(
                "index",
                "positions per row do not apply to spans (pool first or last within them)",
            ));
        }
        if index.len() != self.rows() {
            return Err(KernelError::invalid(
                "index",
                format!("has {} entries for {} rows", index.len(), self.rows()),
            ));
        }
        index
            .iter()
            .enumerate()
            .map(|(row, &position)| {
                let limit = if self.packed {
                    self.row_starts[row + 1] - self.row_starts[row]
                } else {
                    self.token_bound
                };
                match position {
                    -1 => Ok(None),
                    p if p >= 0 && (p as u64) < limit as u64 => Ok(Some(if self.packed {
                        self.row_starts[row] + p as usize
                    } else {
                        p as usize
                    })),
                    p => Err(KernelError::invalid(
                        "index",
                        format!(
                            "row {row}: position {p} is outside 0..{limit} (use -1 for no token)"
                        ),
                    )),
                }
            })
            .collect()
    }

    /// Total real tokens.
    pub fn total(&self) -> usize {
        self.positions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_with_holes_and_left_padding() {
        let mask: Vec<u8> = vec![0, 0, 1, 1, 1, 0, 1, 0];
        let selection = TokenSelection::from_contiguous_mask(&mask, 2, 4).unwrap();
        assert_eq!(selection.row(0), &[2, 3]);
        assert_eq!(selection.row(1), &[0, 2]);
        assert_eq!(selection.counts(), vec![2, 2]);
    }

    #[test]
    fn transposed_mask_reads_through_strides() {
        // Stored as [tokens, rows]; viewed as [rows, tokens].
        let stored: Vec<bool> = vec![true, false, true, true, false, true];
        let selection = TokenSelection::from_mask(&stored, 0, [2, 3], [1, 2]).unwrap();
        assert_eq!(selection.row(0), &[0, 1]);
        assert_eq!(selection.row(1), &[1, 2]);
    }

    #[test]
    fn rows_of_no_tokens_and_index_only_selections() {
        // A [3, 0] mask sliced out of a wider one: row origins point past an empty buffer.
        let selection = TokenSelection::from_mask(&[] as &[u8], 4, [3, 0], [2, 1]).unwrap();
        assert_eq!(selection.counts(), vec![0, 0, 0]);
        let bounds = TokenSelection::positions_only(2, 5);
        assert_eq!(
            (bounds.rows(), bounds.token_bound(), bounds.total()),
            (2, 5, 0)
        );
        assert_eq!(
            bounds.resolve_gather(&[4, -1]).unwrap(),
            vec![Some(4), None]
        );
    }

    #[test]
    fn offsets_are_checked() {
        assert!(TokenSelection::from_offsets(&[0, 2, 1], 1).is_err());
        assert!(TokenSelection::from_offsets(&[1, 2], 2).is_err());
        assert!(TokenSelection::from_offsets(&[0, 2], 3).is_err());
        assert!(TokenSelection::from_offsets(&[], 0).is_err());
        let selection = TokenSelection::from_offsets(&[0, 2, 2, 5], 5).unwrap();
        assert_eq!(selection.row(0), &[0, 1]);
        assert_eq!(selection.row(1), &[] as &[usize]);
        assert_eq!(selection.row(2), &[2, 3, 4]);
    }

    #[test]
    fn spans_take_the_real_tokens_inside_them() {
        // Row 0 left-padded with a hole, row 1 right-padded.
        let mask: Vec<u8> = vec![0, 1, 0, 1, 1, 1, 1, 1, 0, 0];
        let base = TokenSelection::from_contiguous_mask(&mask, 2, 5).unwrap();
        let spans = base
            .spans(&[[0, 0, 3], [1, 1, 5], [0, 2, 3], [1, 0, 0], [0, 0, 5]])
            .unwrap();
        assert_eq!(spans.rows(), 5);
        assert_eq!(spans.source_rows(), 2);
        assert_eq!(spans.row(0), &[1]);
        assert_eq!(spans.row(1), &[1, 2]);
        assert_eq!(spans.row(2), &[] as &[usize]);
        assert_eq!(spans.row(3), &[] as &[usize]);
        assert_eq!(spans.row(4), &[1, 3, 4]);
        assert_eq!(
            (0..5).map(|span| spans.source(span)).collect::<Vec<_>>(),
            vec![0, 1, 0, 1, 0]
        );
        assert!(spans.resolve_gather(&[0; 5]).is_err());
    }

    #[test]
    fn packed_spans_count_from_the_row_start() {
        let base = TokenSelection::from_offsets(&[0, 2, 5], 5).unwrap();
        let spans = base.spans(&[[1, 1, 3], [0, 0, 2]]).unwrap();
        assert_eq!(spans.row(0), &[3, 4]);
        assert_eq!(spans.row(1), &[0, 1]);
        // Row 0 has two tokens: position 3 is past it.
        assert!(base.spans(&[[0, 0, 3]]).is_err());
    }

    #[test]
    fn bad_spans_name_themselves() {
        let base = TokenSelection::from_contiguous_mask(&[1u8; 6], 2, 3).unwrap();
        for (span, says) in [
            ([2, 0, 1], "spans[0] = (2, 0, 1): row 2 is outside 0..2"),
            ([-1, 0, 1], "row -1 is outside"),
            ([0, 2, 1], "needs 0 <= start <= end <= 3"),
            ([0, -1, 1], "needs 0 <= start"),
            ([0, 0, 4], "end <= 3"),
        ] {
            let error = base.spans(&[span]).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }
}
