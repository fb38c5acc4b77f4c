//! The calibration sample of an approximation: which output rows are compared, and the inputs
//! both plans run on.
//!
//! Both plans run on the same full-size inputs (buffers are checked against the bound shapes
//! before any machine code runs), but only the rows in [`sample_rows`] are computed when the
//! plan ends in a fused attention step, and only one batch entry of each random input is drawn
//! (see [`calibration_inputs`]).

pub mod entry;
pub mod rows;

use crate::engine::RunError;
use crate::io::{standard_normal_streams, NormalStream, Tensor, TensorData};
use attnc_ir::dim::resolve_shape;
use attnc_ir::{Bindings, Kernel};
use attnc_jit::plan::{Plan, StepKind};
use std::ops::Range;

/// Query rows compared per calibration: `SAMPLE_RANGES` evenly spaced runs of
/// `SAMPLE_RUN` rows of the first batch entry (all rows when there are fewer).
pub const SAMPLE_RUN: usize = 64;
/// See [`SAMPLE_RUN`].
pub const SAMPLE_RANGES: usize = 4;

/// The output rows compared: [`SAMPLE_RANGES`] evenly spaced runs of [`SAMPLE_RUN`] rows of
/// the first batch entry of an output of shape `output_shape`.
pub fn sample_rows(output_shape: &[usize]) -> Vec<Range<usize>> {
    sample_rows_with(output_shape, SAMPLE_RANGES, SAMPLE_RUN)
}

/// [`sample_rows`] with `ranges` runs of `run` rows (at least one of each).
pub fn sample_rows_with(output_shape: &[usize], ranges: usize, run: usize) -> Vec<Range<usize>> {
    let (ranges, run) = (ranges.max(1), run.max(1));
    let m = match output_shape.len() {
        0 | 1 => 1,
        r => output_shape[r - 2],
    };
    if m <= run.saturating_mul(ranges) {
        return std::iter::once(0..m).collect();
    }
    if ranges == 1 {
        return std::iter::once(0..run).collect();
    }
    (0..ranges)
        .map(|i| {
            // Spread over [0, m): the first run starts at 0, the last one ends at m.
            let start = i * (m - run) / (ranges - 1);
            start..start + run
        })
        .collect()
}

/// Inputs a `--random SEED` run has drawn already: `tensors[i]`, when present, is parameter
/// `i` drawn from stream `i` of `seed` (so its first `[rows, cols]` block is the calibration
/// block of that parameter, value for value).
#[derive(Clone, Copy, Debug, Default)]
pub struct DrawnInputs<'a> {
    /// The seed they were drawn from.
    pub seed: u64,
    /// One slot per parameter.
    pub tensors: &'a [Option<&'a Tensor>],
}

/// The values of one block of a calibration input of `shape` (`len` values): one matrix, its
/// last two axes; the blocks before it are drawn once and repeated (or left zero, [`Fill`]).
fn block_len(shape: &[usize], len: usize) -> usize {
    shape
        .iter()
        .rev()
        .take(2)
        .product::<usize>()
        .clamp(1, len.max(1))
}

/// Whether every input of `kernel` at `bindings` is a single block, so that the sample
/// [`calibration_inputs`] draws is the same whatever its [`Fill`].
pub fn one_block_each(kernel: &Kernel, bindings: &Bindings) -> bool {
    kernel.params.iter().all(|p| {
        resolve_shape(&p.shape, bindings).is_some_and(|shape| {
            crate::io::shape_product(&shape).is_some_and(|len| len <= block_len(&shape, len))
        })
    })
}

/// The calibration inputs: the given tensors, and standard-normal values elsewhere, drawn on
/// up to `threads` threads, or copied from `drawn` where it holds the same stream (drawing is
/// the costly part; copying a block gives the same values).
///
/// A random input of shape `[.., rows, cols]` holds one drawn `[rows, cols]` block (stream
/// `index` of `seed`, as `--random seed` would start it) repeated over its leading axes. The
/// sampled rows belong to the first batch entry, so for per-head programs only that block is
/// read; repeating it (a memory copy) rather than leaving zeros keeps every entry a typical
/// input for programs that mix batch entries (broadcasts, reductions over heads). With
/// [`Fill::FirstBlock`] (for plans that provably read only the first block for the sampled
/// rows, [`Fill::for_plan`]) the rest stays zero: untouched zero pages cost nothing, where
/// repeating wrote every byte of every input.
pub fn calibration_inputs(
    kernel: &Kernel,
    bindings: &Bindings,
    seed: u64,
    given: &[(String, Tensor)],
    drawn: DrawnInputs<'_>,
    fill: Fill,
    threads: usize,
) -> Result<Vec<Tensor>, RunError> {
    enum Slot<'t> {
        Given(Tensor),
        Copied {
            from: &'t Tensor,
            shape: Vec<usize>,
            block: usize,
        },
        Drawn {
            shape: Vec<usize>,
            stream: usize,
        },
    }
    // A drawn tensor's first block is the stream's start whatever its leading axes (a run's
    // `[h, n, d]` input serves a one-entry sample of `[1, n, d]`).
    let reusable = |index: usize, shape: &[usize]| {
        let tensor = drawn.tensors.get(index).copied().flatten()?;
        let rank = shape.len();
        let same_block = tensor.shape.len() == rank
            && tensor.shape[rank.saturating_sub(2)..] == shape[rank.saturating_sub(2)..]
            && !tensor.data.is_empty();
        (drawn.seed == seed && same_block).then_some(tensor)
    };
    let mut slots = Vec::with_capacity(kernel.params.len());
    let mut streams = Vec::new();
    for (index, param) in kernel.params.iter().enumerate() {
        let shape = resolve_shape(&param.shape, bindings).ok_or_else(|| {
            RunError::Calibration(format!("the shape of `{}` is not bound", param.name))
        })?;
        if let Some((_, tensor)) = given.iter().find(|(name, _)| *name == param.name) {
            if tensor.shape != shape {
                return Err(RunError::Calibration(format!(
                    "calibration tensor `{}` has shape {:?}, the kernel needs {:?}",
                    param.name, tensor.shape, shape
                )));
            }
            slots.push(Slot::Given(tensor.clone()));
            continue;
        }
        let len = crate::io::shape_product(&shape).ok_or_else(|| {
            RunError::Calibration(format!("`{}` has too many elements", param.name))
        })?;
        let block = block_len(&shape, len);
        if let Some(from) = reusable(index, &shape) {
            slots.push(Slot::Copied { from, shape, block });
            continue;
        }
        streams.push(NormalStream {
            seed,
            stream: index as u64,
            len: block.min(len),
        });
        slots.push(Slot::Drawn {
            shape,
            stream: streams.len() - 1,
        });
    }
    let mut drawn = standard_normal_streams(&streams, threads);
    // Repeating a block writes the whole tensor: one thread per tensor.
    let inputs = std::thread::scope(|scope| {
        let handles: Vec<_> = slots
            .into_iter()
            .zip(&kernel.params)
            .map(|(slot, param)| {
                let values = match &slot {
                    Slot::Drawn { stream, .. } => std::mem::take(&mut drawn[*stream]),
                    _ => Vec::new(),
                };
                scope.spawn(move || match slot {
                    Slot::Given(tensor) => tensor,
                    Slot::Copied { from, shape, block } => {
                        let len = shape.iter().product();
                        let data = match &from.data {
                            TensorData::F32(v) => {
                                TensorData::F32(fill.apply(&v[..block.min(v.len())], len))
                            }
                            TensorData::F16(v) => {
                                TensorData::F16(fill.apply(&v[..block.min(v.len())], len))
                            }
                            TensorData::Bf16(v) => {
                                TensorData::Bf16(fill.apply(&v[..block.min(v.len())], len))
                            }
                            TensorData::I32(v) => {
                                TensorData::I32(fill.apply(&v[..block.min(v.len())], len))
                            }
                        };
                        Tensor { shape, data }
                    }
                    Slot::Drawn { shape, .. } => {
                        let values = fill.apply(&values, shape.iter().product());
                        Tensor {
                            shape,
                            data: TensorData::from_f32_as(values, param.dtype),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    Ok(inputs)
}

/// What a calibration input holds past its first `[rows, cols]` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The block again, entry after entry.
    Repeat,
    /// Zeros (never read by the sampled rows, see [`Fill::for_plan`]).
    FirstBlock,
}

impl Fill {
    /// [`Fill::FirstBlock`] when the sampled rows of `plan` (the first batch entry of its
    /// output) read only the first block of each input: the plan is one fused attention
    /// step, after host conversions or the int8 pre-pass of its inputs. Output entry 0 of a
    /// fused attention reads entry 0 of every batched operand (a shared or grouped K or V
    /// maps entry 0 to entry 0 too), and those host steps work element by element (the
    /// pre-pass of a sampled run quantizes entry 0 only).
    pub fn for_plan(plan: &Plan) -> Fill {
        let Some((last, before)) = plan.steps.split_last() else {
            return Fill::Repeat;
        };
        let host_conversions = before
            .iter()
            .all(|s| matches!(s.kind, StepKind::Convert(_) | StepKind::Quantize(_)));
        if host_conversions && matches!(last.kind, StepKind::Attention(_)) {
            Fill::FirstBlock
        } else {
            Fill::Repeat
        }
    }

    /// `block`, then up to `len` values as this fill says.
    fn apply<T: Copy + Default>(self, block: &[T], len: usize) -> Vec<T> {
        match self {
            Fill::Repeat => repeat_block(block.to_vec(), len),
            Fill::FirstBlock => {
                let mut out = vec![T::default(); len];
                let n = block.len().min(len);
                out[..n].copy_from_slice(&block[..n]);
                out
            }
        }
    }
}

/// `block` repeated (by memory copies) up to `len` values.
fn repeat_block<T: Copy>(mut block: Vec<T>, len: usize) -> Vec<T> {
    if block.is_empty() || block.len() >= len {
        block.truncate(len);
        return block;
    }
    let period = block.len();
    block.reserve_exact(len - period);
    while block.len() < len {
        let take = period.min(len - block.len());
        block.extend_from_within(..take);
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_rows_cover_small_outputs_and_spread_over_large_ones() {
        assert_eq!(sample_rows(&[2, 100, 8]), vec![0..100]);
        assert_eq!(sample_rows(&[8]), vec![0..1]);
        let rows = sample_rows(&[8, 4096, 64]);
        assert_eq!(rows.len(), SAMPLE_RANGES);
        assert_eq!(rows[0], 0..SAMPLE_RUN);
        assert_eq!(rows[SAMPLE_RANGES - 1].end, 4096);
        assert_eq!(sample_rows_with(&[1000, 3], 1, 10), vec![0..10]);
        assert_eq!(sample_rows_with(&[1000, 3], 0, 0), vec![0..1]);
    }

    #[test]
    fn repeated_blocks_tile_the_whole_length() {
        assert_eq!(
            repeat_block(vec![1.0, 2.0, 3.0], 7),
            [1., 2., 3., 1., 2., 3., 1.]
        );
        assert_eq!(repeat_block(vec![1.0, 2.0], 1), [1.0]);
        assert!(repeat_block(Vec::<f32>::new(), 0).is_empty());
    }
}
