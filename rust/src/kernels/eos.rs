//! Finding a token id per row (the EOS position CLIP pools at).

use super::error::KernelError;
use super::selection::TokenSelection;
use super::view::fits_inside;

/// A token id element: int32 or int64.
pub trait TokenId: Copy + Send + Sync + 'static {
    fn as_i64(self) -> i64;
}

impl TokenId for i32 {
    fn as_i64(self) -> i64 {
        i64::from(self)
    }
}

impl TokenId for i64 {
    fn as_i64(self) -> i64 {
        self
    }
}

/// For each row, the first real token (per `selection`) of `[B, T]` `input_ids` whose id is
/// `token_id`, or -1 where the row has none. Padded positions are skipped, since pad and
/// EOS often share an id (GPT-2, CLIP).
pub fn first_token_positions<I: TokenId>(
    input_ids: &[I],
    origin: usize,
    shape: [usize; 2],
    strides: [isize; 2],
    selection: &TokenSelection,
    token_id: i64,
) -> Result<Vec<i64>, KernelError> {
    if !fits_inside(input_ids.len(), origin, &shape, &strides) {
        return Err(KernelError::invalid(
            "input_ids",
            format!(
                "shape {shape:?} with strides {strides:?} reaches outside a buffer of {} elements",
                input_ids.len()
            ),
        ));
    }
    if shape[0] != selection.rows() || shape[1] != selection.token_bound() {
        return Err(KernelError::invalid(
            "input_ids",
            format!(
                "has shape {shape:?} but attention_mask has [{}, {}]",
                selection.rows(),
                selection.token_bound()
            ),
        ));
    }
    Ok((0..shape[0])
        .map(|row| {
            selection
                .row(row)
                .iter()
                .find(|&&token| {
                    let index =
                        origin as isize + row as isize * strides[0] + token as isize * strides[1];
                    input_ids[index as usize].as_i64() == token_id
                })
                .map_or(-1, |&token| token as i64)
        })
        .collect())
}

/// The rows that `first_token_positions` found nothing in.
pub fn missing_rows(positions: &[i64]) -> Vec<usize> {
    positions
        .iter()
        .enumerate()
        .filter(|(_, &position)| position < 0)
        .map(|(row, _)| row)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_padding_and_reports_missing_rows() {
        // Row 0: left padded with the EOS id as pad; row 1: no EOS at all.
        let ids: Vec<i64> = vec![7, 7, 5, 7, 5, 6, 4, 3];
        let mask: Vec<u8> = vec![0, 0, 1, 1, 1, 1, 1, 1];
        let selection = TokenSelection::from_contiguous_mask(&mask, 2, 4).unwrap();
        let positions = first_token_positions(&ids, 0, [2, 4], [4, 1], &selection, 7).unwrap();
        assert_eq!(positions, vec![3, -1]);
        assert_eq!(missing_rows(&positions), vec![1]);
    }
}
