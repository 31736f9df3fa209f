//! Embedding lookup (rows of a table by index) and its gradient. Burn's flex backward allocates
//! the [vocab, d] gradient zero-filled on one thread and then copies it once more to realign the
//! buffer (31 MB each for the `small` text tower's 30522 × 256 table, twice per paired step, while
//! the other core waits); here the table gradient is written once, over the threads, and the
//! looked-up rows are added into it in index order (the same bits on every run).

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::linear::dims2;
use super::{contiguous, written_f32};

/// Rows copied per rayon task: about 16k values (64 KB), so a task is worth its scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// Rows `ids` of `table` [vocab, d] → [ids.len(), d]. Every id is below vocab (checked by the
/// caller).
pub(super) fn forward(table: FlexTensor, ids: &[usize]) -> FlexTensor {
    let [_, d] = dims2(&table);
    let table = contiguous(table);
    let t = table.as_slice::<f32>().expect("contiguous f32 tensor");
    let rows_per_task = rows_per_task(d);
    // SAFETY: the chunks cover the output; each writes d values for each of its rows.
    let (out, ()) = unsafe {
        written_f32(ids.len() * d, |out| {
            out.par_chunks_mut((rows_per_task * d).max(1))
                .zip(ids.par_chunks(rows_per_task))
                .for_each(|(o, ids)| {
                    for (o, &id) in o.chunks_exact_mut(d.max(1)).zip(ids) {
                        o.copy_from_slice(&t[id * d..(id + 1) * d]);
                    }
                })
        })
    };
    FlexTensor::from_data(TensorData::new(out, [ids.len(), d]))
}

/// The table's gradient [vocab, d] of [`forward`] for `grad` [ids.len(), d]: zero except the
/// rows looked up, which sum their rows of `grad` (added in the order of `ids`).
pub(super) fn backward(grad: FlexTensor, ids: &[usize], vocab: usize) -> FlexTensor {
    let [n, d] = dims2(&grad);
    assert_eq!(n, ids.len(), "one gradient row per id");
    let grad = contiguous(grad);
    let g = grad.as_slice::<f32>().expect("contiguous f32 tensor");
    // SAFETY: the zero fill writes every element before the scatter reads any.
    let (table, ()) = unsafe {
        written_f32(vocab * d, |t| {
            t.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
            for (&id, row) in ids.iter().zip(g.chunks_exact(d.max(1))) {
                t[id * d..(id + 1) * d].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
        })
    };
    FlexTensor::from_data(TensorData::new(table, [vocab, d]))
}
