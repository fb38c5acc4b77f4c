//! Defining a fused attention function: the checks every kernel shares, then the exact or the
//! int8 kernel by the spec's precision.

use super::skeleton::{codegen_err, Codegen, DefinedAttention};
use super::spec::{AttentionSpec, Precision};
use crate::error::{JitError, Result};
use cranelift_jit::JITModule;
use cranelift_module::FuncId;

/// Defines (does not finalize) the fused attention function `name` in `module` and returns its
/// id and CLIF text.
///
/// # ABI
///
/// ```text
/// extern "C" fn(inputs: *const *const u8, output: *mut f32,
///               batch_index: u64, row_begin: u64, row_end: u64)
/// ```
///
/// - `inputs[k]` is the raw data pointer of the IR kernel's parameter `k` (the
///   [`TensorRef::slot`](super::TensorRef::slot)s of the spec index this array), each a row-major contiguous buffer of
///   its parameter's bound shape and storage dtype (f32, f16 or bf16). The same array can be
///   passed to every kernel of a plan.
/// - `output` is the start of the whole f32 output `[batch..., m, dv]`, row-major; the call
///   writes rows `row_begin..min(row_end, m)` of batch entry `batch_index`, i.e. the f32 at
///   `((batch_index * m) + i) * dv + c`, and nothing else.
/// - `batch_index < spec.batch_count()` (flattened row-major over [`AttentionSpec::batch`]).
/// - Shapes are constants in the code; the caller has checked every buffer (the kernel reads
///   only inside them). Calls on disjoint row ranges may run concurrently; each row's result
///   is independent of the range it was computed in (bit-identical under any split). A range
///   that starts or ends inside a [`QUERY_TILE`](super::QUERY_TILE)-row tile recomputes, but does not write, the
///   tile's other rows. An empty range writes nothing.
///
/// Besides the function, this declares and defines a read-only data object `{name}.tiles`
/// (the compile-time tile table), so `name` must be unique in the module; both are usable
/// after `module.finalize_definitions()`.
///
/// # Errors
///
/// [`JitError::Shape`] past 2^29 rows or keys; [`JitError::Codegen`] when Cranelift rejects the
/// function (verifier, or an instruction this CPU cannot lower).
pub fn define_attention(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
) -> Result<(FuncId, String)> {
    let codegen = Codegen {
        dot_product: true,
        keep_text: true,
    };
    let defined = define_attention_with(module, spec, name, codegen)?;
    Ok((defined.id, defined.clif))
}

/// [`define_attention`] with a choice ([`Codegen`]): whether the int8 kernel may use the CPU's
/// u8·i8 dot-product instruction, and whether the function's text forms are kept.
///
/// For [`Precision::Int8`] the ABI differs: `inputs[0]` is the packed buffer of
/// [`super::quant::pack`] and the spec's bias slots index the same array (see
/// [`super::int8`]).
pub fn define_attention_with(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    codegen: Codegen,
) -> Result<DefinedAttention> {
    if spec.m >= 1 << 29 || spec.n >= 1 << 29 {
        return Err(JitError::Shape(format!(
            "attention of {} × {} exceeds the fused kernel's 2^29 limit",
            spec.m, spec.n
        )));
    }
    if let Some(t) = [&spec.q, &spec.k, &spec.v]
        .into_iter()
        .find(|t| t.convert.is_some())
    {
        return Err(codegen_err(
            name,
            format!(
                "operand `{}` must be converted before the kernel reads it",
                t.name
            ),
        ));
    }
    if spec.precision == Precision::Int8 {
        return super::int8::define_int8(module, spec, name, codegen);
    }
    super::exact::define_exact(module, spec, name, codegen)
}
