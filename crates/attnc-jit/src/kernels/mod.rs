//! Kernel generators: each turns one planned step into a Cranelift function with the shared
//! ABI of [`crate::jit::KERNEL_ABI`]. This module holds the pieces they share: the parameter
//! bundle, loops, addressing and host-function calls.

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod prefix;
pub mod reduce;

use crate::error::Result;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

/// The five parameters of every kernel, as SSA values of its entry block.
#[derive(Clone, Copy, Debug)]
pub struct KernelArgs {
    /// `*const *const u8`: one pointer per operand buffer (in its element type).
    pub inputs: Value,
    /// `*mut f32`: the output buffer.
    pub output: Value,
    /// The flat batch index.
    pub batch: Value,
    /// First row of the range.
    pub begin: Value,
    /// One past the last row of the range.
    pub end: Value,
}

impl KernelArgs {
    /// Bundles the entry-block parameters.
    pub fn new(p: [Value; 5]) -> KernelArgs {
        KernelArgs {
            inputs: p[0],
            output: p[1],
            batch: p[2],
            begin: p[3],
            end: p[4],
        }
    }

    /// Loads the pointer of operand buffer `k`.
    pub fn input_ptr(&self, b: &mut FunctionBuilder, k: usize) -> Value {
        b.ins().load(types::I64, mem(), self.inputs, (8 * k) as i32)
    }
}

/// Flags of every load and store: in bounds by construction (the runtime checks lengths), so
/// `notrap`; NOT `aligned`, which would promise 16-byte alignment for f32x4 accesses at
/// arbitrary element offsets.
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// `base + 4 * index` (address of f32 element `index`).
pub fn elem_addr(b: &mut FunctionBuilder, base: Value, index: Value) -> Value {
    let bytes = b.ins().ishl_imm_s(index, 2);
    b.ins().iadd(base, bytes)
}

/// An i64 constant.
pub fn iconst(b: &mut FunctionBuilder, v: i64) -> Value {
    b.ins().iconst(types::I64, v)
}

/// Emits `for i in (start..end).step_by(step) { body(i) }` (signed compare `i < end`); the
/// current block afterwards is the loop exit. Loop-carried values go through `Variable`s.
pub fn counted_loop(
    b: &mut FunctionBuilder,
    start: Value,
    end: Value,
    step: i64,
    body: impl FnOnce(&mut FunctionBuilder, Value) -> Result<()>,
) -> Result<()> {
    let header = b.create_block();
    b.append_block_param(header, types::I64);
    let body_block = b.create_block();
    let exit = b.create_block();
    b.ins().jump(header, &[BlockArg::Value(start)]);
    b.switch_to_block(header);
    let i = b.block_params(header)[0];
    let go = b.ins().icmp(IntCC::SignedLessThan, i, end);
    b.ins().brif(go, body_block, &[], exit, &[]);
    b.switch_to_block(body_block);
    body(b, i)?;
    let next = b.ins().iadd_imm_s(i, step);
    b.ins().jump(header, &[BlockArg::Value(next)]);
    b.switch_to_block(exit);
    Ok(())
}

/// Splits a flat index into coordinates of `dims` (row-major) and returns `Σ coord·strides`
/// for each stride vector, with constant divisions.
pub fn strided_offsets(
    b: &mut FunctionBuilder,
    flat: Value,
    dims: &[usize],
    strides: &[&[usize]],
) -> Vec<Value> {
    let mut offsets: Vec<Value> = strides.iter().map(|_| iconst(b, 0)).collect();
    let mut rest = flat;
    for axis in (0..dims.len()).rev() {
        let size = dims[axis].max(1) as i64;
        let coord = if axis == 0 {
            rest
        } else {
            b.ins().urem_imm_s(rest, size)
        };
        if axis > 0 {
            rest = b.ins().udiv_imm_s(rest, size);
        }
        for (off, st) in offsets.iter_mut().zip(strides) {
            if st[axis] != 0 {
                let term = b.ins().imul_imm_s(coord, st[axis] as i64);
                *off = b.ins().iadd(*off, term);
            }
        }
    }
    offsets
}
