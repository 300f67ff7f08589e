//! The fused kernel against a plain f64 reference: every pool, combine, element type and
//! layout, by proptest and by hand.

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
                    prop::collection::vec(-1.0f64..1.0, layer_count).prop_map(Combine::Weighted),
                ],
                prop::collection::vec(-1i64..tokens as i64, rows),
            )
                .prop_map(|(shape, layers, mask, pools, combine, index)| Case {
                    shape,
                    layers,
                    mask,
                    pools,
                    combine,
                    index,
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
    let selection = TokenSelection::from_contiguous_mask(&case.mask, case.shape[0], case.shape[1])
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
    let pooled = pool_layers(&views, &selection, &pools, &case.combine, None, execution).unwrap();
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
    assert!(run(&[], &selection, &[Pool::Mean], Combine::Sum, None).starts_with("hidden_states"));
    assert!(run(
        &[view, other],
        &selection,
        &[Pool::Mean],
        Combine::Sum,
        None
    )
    .contains("layer 1"));
    assert!(
        run(&[view], &wrong_mask, &[Pool::Mean], Combine::Sum, None).starts_with("attention_mask")
    );
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
