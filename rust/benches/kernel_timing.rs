//! Times the fused kernel alone (no Python), one thread: `cargo bench --bench kernel_timing`.

use std::time::Instant;

use half::f16;
use hiddenpool::kernels::{
    pool_layers, Combine, Element, Execution, LayerView, Pool, TokenSelection,
};

const SHAPE: [usize; 3] = [32, 256, 768];

fn median_micros(mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Median microseconds of pooling `values` (shape `SHAPE`) with `pools` on one thread.
fn time_pools<T: Element>(values: &[T], selection: &TokenSelection, pools: &[Pool]) -> f64 {
    let view = LayerView::contiguous(values, SHAPE).unwrap();
    median_micros(|| {
        pool_layers(
            &[view],
            selection,
            pools,
            &Combine::Sum,
            None,
            Execution::Sequential,
        )
        .unwrap();
    })
}

fn main() {
    let [rows, tokens, hidden] = SHAPE;
    let values: Vec<f32> = (0..rows * tokens * hidden)
        .map(|i| (i % 97) as f32 * 0.01)
        .collect();
    let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let mask = vec![1u8; rows * tokens];
    let selection = TokenSelection::from_contiguous_mask(&mask, rows, tokens).unwrap();
    let megabytes = (values.len() * 4) as f64 / 1e6;
    for (name, pools) in [
        ("mean", vec![Pool::Mean]),
        ("max", vec![Pool::Max]),
        ("mean+max", vec![Pool::Mean, Pool::Max]),
    ] {
        let micros = time_pools(&values, &selection, &pools);
        let half_micros = time_pools(&halves, &selection, &pools);
        println!(
            "{name:>9}: float32 {micros:8.0} µs ({:5.1} GB/s), float16 {half_micros:8.0} µs, one thread",
            megabytes * 1e6 / micros / 1e3
        );
    }
    let sum_micros = median_micros(|| {
        let total: f32 = values.iter().sum();
        std::hint::black_box(total);
    });
    println!("plain sequential sum of the same float32 buffer: {sum_micros:.0} µs");
}
