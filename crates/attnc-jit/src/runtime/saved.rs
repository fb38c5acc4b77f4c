//! A gradient plan that takes its forward from the caller.
//!
//! Training runs the forward, keeps what the backward needs and later runs the backward.
//! When a gradient plan is one fused attention's backward step over the kernel's own inputs
//! (the common `softmax(q @ k.T / sqrt(d)) @ v` differentiated with respect to any of its
//! operands), the forward can write the attention's row log-sum-exp beside its output at no
//! extra pass ([`CompiledKernel::run_forward_saving`]), and the backward then starts from
//! them ([`CompiledKernel::run_outputs_saved`]) instead of recomputing the forward: one
//! forward less per training step. Any other plan returns `None` from both and is run whole by
//! [`CompiledKernel::run_outputs`].

use super::{CompiledKernel, Input, Output};
use crate::backward::{AttentionBackward, BackwardKernel, Residuals, Saved};
use crate::buffer::BufferView;
use crate::error::{JitError, Result};
use crate::plan::{BufferSource, StepKind};

impl CompiledKernel {
    /// The fused attention backward that is this plan's only step, reading only the plan's
    /// inputs (no conversion or other step before it), or `None`.
    pub fn saved_attention(&self) -> Option<&AttentionBackward> {
        let plan = self.plan();
        let [step] = plan.steps.as_slice() else {
            return None;
        };
        let StepKind::Backward(b) = &step.kind else {
            return None;
        };
        let BackwardKernel::Attention(a) = &b.kernel else {
            return None;
        };
        let inputs_only = step
            .inputs
            .iter()
            .all(|&i| matches!(plan.buffers[i].source, BufferSource::Input(_)));
        inputs_only.then_some(&**a)
    }

    /// The forward of a plan with a [`saved_attention`](Self::saved_attention) step: its
    /// output and row log-sum-exp, from `inputs` (every parameter but the last, the
    /// cotangent, which the forward does not read), or `None` for any other plan.
    pub fn run_forward_saving(
        &self,
        inputs: &[Input<'_>],
        threads: usize,
    ) -> Result<Option<Residuals>> {
        let Some(attention) = self.saved_attention() else {
            return Ok(None);
        };
        let params = self.params.len();
        let forward = &self.params[..params.saturating_sub(1)];
        if inputs.len() != forward.len() {
            return Err(JitError::Buffer {
                input: self.plan.kernel.clone(),
                detail: format!(
                    "the forward takes {} inputs, got {}",
                    forward.len(),
                    inputs.len()
                ),
            });
        }
        self.check_some(inputs)?;
        attention
            .forward(
                &self.first_step_views(inputs),
                self.step_threads(0, threads),
            )
            .map(Some)
    }

    /// [`CompiledKernel::run_outputs`] from the forward's `saved` output and log-sum-exp
    /// (laid out as [`run_forward_saving`](Self::run_forward_saving) gives them for the same
    /// inputs), or `None` for a plan without a [`saved_attention`](Self::saved_attention)
    /// step.
    pub fn run_outputs_saved(
        &self,
        inputs: &[Input<'_>],
        saved: Saved<'_>,
        threads: usize,
    ) -> Result<Option<Vec<Output>>> {
        let Some(attention) = self.saved_attention() else {
            return Ok(None);
        };
        self.check_inputs(inputs)?;
        let step = &self.plan.steps[0];
        let StepKind::Backward(b) = &step.kind else {
            return Ok(None);
        };
        let views = self.first_step_views(inputs);
        let mut grads: Vec<Option<Vec<f32>>> = attention
            .run_saved(&views, Some(saved), self.step_threads(0, threads))?
            .into_iter()
            .map(Some)
            .collect();
        let outputs = if self.plan.outputs.is_empty() {
            vec![(self.plan.output, self.plan.output_shape.clone())]
        } else {
            self.plan.outputs.clone()
        };
        let results = outputs
            .iter()
            .enumerate()
            .map(|(i, (buf, shape))| {
                let k = b.outputs.iter().position(|o| o == buf).ok_or_else(|| {
                    JitError::Shape("a gradient is not written by the backward step".into())
                })?;
                // Moved out (a gradient is tens of megabytes), unless a later result is the
                // same buffer.
                let again = outputs[i + 1..].iter().any(|(later, _)| later == buf);
                let data = match again {
                    true => grads[k].clone(),
                    false => grads[k].take(),
                };
                Ok(Output {
                    shape: shape.clone(),
                    data: data.expect("invariant: taken by its last result only"),
                })
            })
            .collect::<Result<Vec<Output>>>()?;
        Ok(Some(results))
    }

    /// The first step's input buffers, every one a kernel input (a parameter past `inputs`,
    /// the cotangent for the forward, reads as empty).
    fn first_step_views<'a>(&self, inputs: &'a [Input<'a>]) -> Vec<BufferView<'a>> {
        self.plan.steps[0]
            .inputs
            .iter()
            .map(|&b| match self.plan.buffers[b].source {
                BufferSource::Input(i) if i < inputs.len() => inputs[i].view(),
                _ => BufferView::F32(&[]),
            })
            .collect()
    }
}
