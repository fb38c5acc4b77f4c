//! Register-tiled f32x4 FMA matrix product over the last two axes.
//!
//! `C[b, i, j] = Σ_k A[b, i, k] · B[b, k, j]`, with leading axes broadcast (stride 0) and
//! both operands read through arbitrary row/column strides, so a transposed operand (`k.T`)
//! is never materialized. The work space is (batches, m rows). Paths, chosen per step:
//!
//! * `B` contiguous along `j`: a tile of 4 rows × 8 columns of `C` is kept in eight f32x4
//!   registers while `k` runs, `A` entries are broadcast, `B` rows loaded as vectors. Edges
//!   use 1-row and 4-column tiles and a scalar tail. Every element is one FMA chain over `k`
//!   in order, whichever tile computes it, so thread splits do not change results.
//! * `A` and `B` both contiguous along `k` (`q @ k.T`): 2 × 4 tiles of dot products, each
//!   with f32x4 partial sums over k.
//! * anything else: scalar FMA chains.

use super::{counted_loop, elem_addr, iconst, mem, strided_offsets, KernelArgs};
use crate::error::Result;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// One matrix product, at bound shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatMulSpec {
    /// The output's leading (batch) axes.
    pub batch: Vec<usize>,
    /// `A`'s stride per batch axis (0 where broadcast).
    pub a_batch_strides: Vec<usize>,
    /// `B`'s stride per batch axis (0 where broadcast).
    pub b_batch_strides: Vec<usize>,
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `B` and `C`.
    pub n: usize,
    /// The contracted size.
    pub k: usize,
    /// `A`'s stride along i.
    pub a_rs: usize,
    /// `A`'s stride along k.
    pub a_cs: usize,
    /// `B`'s stride along k.
    pub b_rs: usize,
    /// `B`'s stride along j.
    pub b_cs: usize,
    /// Whether the product runs on the full-width tier ([`crate::wide::run_matmul`]) instead
    /// of this module's Cranelift kernel.
    pub wide: bool,
}

impl MatMulSpec {
    /// The work space: (batches, m).
    pub fn work(&self) -> (usize, usize) {
        (self.batch.iter().product(), self.m)
    }

    /// Floating-point operations (for threading decisions).
    pub fn flops(&self) -> usize {
        2usize
            .saturating_mul(self.work().0)
            .saturating_mul(self.m)
            .saturating_mul(self.n)
            .saturating_mul(self.k)
    }
}

/// Rows and column vectors of the main register tile.
const TILE_ROWS: usize = 4;
const TILE_VECS: usize = 2;

/// Pointers of one batch.
struct Bases {
    a: Value,
    b: Value,
    c: Value,
}

/// Generates the body of a matmul kernel.
pub fn emit(b: &mut FunctionBuilder, args: KernelArgs, spec: &MatMulSpec) -> Result<()> {
    let a_ptr = args.input_ptr(b, 0);
    let b_ptr = args.input_ptr(b, 1);
    let offs = strided_offsets(
        b,
        args.batch,
        &spec.batch,
        &[&spec.a_batch_strides, &spec.b_batch_strides],
    );
    let a = elem_addr(b, a_ptr, offs[0]);
    let bb = elem_addr(b, b_ptr, offs[1]);
    let c_off = b.ins().imul_imm_s(args.batch, (spec.m * spec.n) as i64);
    let c = elem_addr(b, args.output, c_off);
    let bases = Bases { a, b: bb, c };
    if spec.b_cs == 1 && spec.n >= 4 {
        // Rows in blocks of TILE_ROWS, then single rows.
        let count = b.ins().isub(args.end, args.begin);
        let blocks = b.ins().udiv_imm_s(count, TILE_ROWS as i64);
        let span = b.ins().imul_imm_s(blocks, TILE_ROWS as i64);
        let mid = b.ins().iadd(args.begin, span);
        counted_loop(b, args.begin, mid, TILE_ROWS as i64, |b, i| {
            row_block(b, spec, &bases, i, TILE_ROWS);
            Ok(())
        })?;
        counted_loop(b, mid, args.end, 1, |b, i| {
            row_block(b, spec, &bases, i, 1);
            Ok(())
        })?;
    } else if spec.b_rs == 1 && spec.a_cs == 1 && spec.k >= 4 {
        let count = b.ins().isub(args.end, args.begin);
        let blocks = b.ins().udiv_imm_s(count, DOT_ROWS as i64);
        let span = b.ins().imul_imm_s(blocks, DOT_ROWS as i64);
        let mid = b.ins().iadd(args.begin, span);
        counted_loop(b, args.begin, mid, DOT_ROWS as i64, |b, i| {
            dot_rows(b, spec, &bases, i, DOT_ROWS)
        })?;
        counted_loop(b, mid, args.end, 1, |b, i| dot_rows(b, spec, &bases, i, 1))?;
    } else {
        counted_loop(b, args.begin, args.end, 1, |b, i| {
            let zero = iconst(b, 0);
            let n = iconst(b, spec.n as i64);
            counted_loop(b, zero, n, 1, |b, j| {
                scalar_element(b, spec, &bases, i, j);
                Ok(())
            })
        })?;
    }
    b.ins().return_(&[]);
    Ok(())
}

/// `C[i..i+rows, :]` for `B` contiguous along j: 8-column tiles, a 4-column tile, then
/// scalar columns.
fn row_block(b: &mut FunctionBuilder, spec: &MatMulSpec, bases: &Bases, i: Value, rows: usize) {
    let wide = 4 * TILE_VECS;
    let mut j = spec.n / wide * wide;
    let zero = iconst(b, 0);
    let end = iconst(b, j as i64);
    let _ = counted_loop(b, zero, end, wide as i64, |b, j0| {
        vector_tile(b, spec, bases, i, rows, j0, TILE_VECS);
        Ok(())
    });
    while j + 4 <= spec.n {
        let j0 = iconst(b, j as i64);
        vector_tile(b, spec, bases, i, rows, j0, 1);
        j += 4;
    }
    for r in 0..rows {
        let ir = b.ins().iadd_imm_s(i, r as i64);
        for jj in j..spec.n {
            let jv = iconst(b, jj as i64);
            scalar_element(b, spec, bases, ir, jv);
        }
    }
}

/// A `rows × 4·vecs` tile of C at (i, j0) held in registers over the k loop.
fn vector_tile(
    b: &mut FunctionBuilder,
    spec: &MatMulSpec,
    bases: &Bases,
    i: Value,
    rows: usize,
    j0: Value,
    vecs: usize,
) {
    let zero_f = b.ins().f32const(0.0);
    let zero_v = b.ins().splat(types::F32X4, zero_f);
    let mut acc: Vec<Variable> = Vec::with_capacity(rows * vecs);
    for _ in 0..rows * vecs {
        let var = b.declare_var(types::F32X4);
        b.def_var(var, zero_v);
        acc.push(var);
    }
    // Rows of A as byte offsets from row i's pointer when they fit an immediate, else as
    // separate pointers.
    let row_bytes = spec
        .a_rs
        .checked_mul(4 * rows)
        .filter(|&x| x <= i32::MAX as usize);
    let a_i = {
        let off = b.ins().imul_imm_s(i, spec.a_rs as i64);
        elem_addr(b, bases.a, off)
    };
    let a_rows: Vec<(Value, i32)> = (0..rows)
        .map(|r| match row_bytes {
            Some(_) => (a_i, (4 * r * spec.a_rs) as i32),
            None => {
                let ir = b.ins().iadd_imm_s(i, r as i64);
                let off = b.ins().imul_imm_s(ir, spec.a_rs as i64);
                (elem_addr(b, bases.a, off), 0)
            }
        })
        .collect();
    // One k step: B row k at j0 as vectors, A column k broadcast per row, FMAs in order.
    let step = |b: &mut FunctionBuilder, k: Value| {
        let b_off = b.ins().imul_imm_s(k, spec.b_rs as i64);
        let b_off = b.ins().iadd(b_off, j0);
        let b_row = elem_addr(b, bases.b, b_off);
        let bv: Vec<Value> = (0..vecs)
            .map(|v| b.ins().load(types::F32X4, mem(), b_row, (16 * v) as i32))
            .collect();
        let a_off = b.ins().imul_imm_s(k, spec.a_cs as i64);
        for (r, (a_row, offset)) in a_rows.iter().enumerate() {
            let a_addr = elem_addr(b, *a_row, a_off);
            let av = b.ins().load(types::F32, mem(), a_addr, *offset);
            let av = b.ins().splat(types::F32X4, av);
            for (v, bv) in bv.iter().enumerate() {
                let var = acc[r * vecs + v];
                let old = b.use_var(var);
                let new = b.ins().fma(av, *bv, old);
                b.def_var(var, new);
            }
        }
    };
    // (Unrolling k by two measured no faster here.)
    let zero = iconst(b, 0);
    let kk = iconst(b, spec.k as i64);
    let _ = counted_loop(b, zero, kk, 1, |b, k| {
        step(b, k);
        Ok(())
    });
    for r in 0..rows {
        let ir = b.ins().iadd_imm_s(i, r as i64);
        let off = b.ins().imul_imm_s(ir, spec.n as i64);
        let off = b.ins().iadd(off, j0);
        let c_row = elem_addr(b, bases.c, off);
        for v in 0..vecs {
            let x = b.use_var(acc[r * vecs + v]);
            b.ins().store(mem(), x, c_row, (16 * v) as i32);
        }
    }
}

/// One element as a scalar FMA chain over k.
fn scalar_element(b: &mut FunctionBuilder, spec: &MatMulSpec, bases: &Bases, i: Value, j: Value) {
    let acc = b.declare_var(types::F32);
    let zero_f = b.ins().f32const(0.0);
    b.def_var(acc, zero_f);
    let a_off = b.ins().imul_imm_s(i, spec.a_rs as i64);
    let a_row = elem_addr(b, bases.a, a_off);
    let b_off = b.ins().imul_imm_s(j, spec.b_cs as i64);
    let b_col = elem_addr(b, bases.b, b_off);
    let zero = iconst(b, 0);
    let kk = iconst(b, spec.k as i64);
    let _ = counted_loop(b, zero, kk, 1, |b, k| {
        let ka = b.ins().imul_imm_s(k, spec.a_cs as i64);
        let pa = elem_addr(b, a_row, ka);
        let kb = b.ins().imul_imm_s(k, spec.b_rs as i64);
        let pb = elem_addr(b, b_col, kb);
        let x = b.ins().load(types::F32, mem(), pa, 0);
        let y = b.ins().load(types::F32, mem(), pb, 0);
        let old = b.use_var(acc);
        let new = b.ins().fma(x, y, old);
        b.def_var(acc, new);
        Ok(())
    });
    let sum = b.use_var(acc);
    store_c(b, spec, bases, i, j, sum);
}

/// Stores scalar `x` at C[i, j].
fn store_c(
    b: &mut FunctionBuilder,
    spec: &MatMulSpec,
    bases: &Bases,
    i: Value,
    j: Value,
    x: Value,
) {
    let off = b.ins().imul_imm_s(i, spec.n as i64);
    let off = b.ins().iadd(off, j);
    let addr = elem_addr(b, bases.c, off);
    b.ins().store(mem(), x, addr, 0);
}

/// Rows and columns of the dot-product tile (`A` and `B` contiguous along k).
const DOT_ROWS: usize = 2;
const DOT_COLS: usize = 4;

/// `C[i..i+rows, :]` when A and B are contiguous along k: tiles of `rows × 4` elements, each
/// with its own f32x4 partial sums over k, then a fixed pairwise lane sum and a scalar k tail.
/// The per-element operation sequence does not depend on the tile, so splits do not change
/// results.
fn dot_rows(
    b: &mut FunctionBuilder,
    spec: &MatMulSpec,
    bases: &Bases,
    i: Value,
    rows: usize,
) -> Result<()> {
    let full = spec.n / DOT_COLS * DOT_COLS;
    let zero = iconst(b, 0);
    let end = iconst(b, full as i64);
    counted_loop(b, zero, end, DOT_COLS as i64, |b, j0| {
        dot_tile(b, spec, bases, i, rows, j0, DOT_COLS)
    })?;
    for j in full..spec.n {
        let j0 = iconst(b, j as i64);
        dot_tile(b, spec, bases, i, rows, j0, 1)?;
    }
    Ok(())
}

/// One `rows × cols` tile of dot products at (i, j0).
fn dot_tile(
    b: &mut FunctionBuilder,
    spec: &MatMulSpec,
    bases: &Bases,
    i: Value,
    rows: usize,
    j0: Value,
    cols: usize,
) -> Result<()> {
    let a_rows: Vec<Value> = (0..rows)
        .map(|r| {
            let ir = b.ins().iadd_imm_s(i, r as i64);
            let off = b.ins().imul_imm_s(ir, spec.a_rs as i64);
            elem_addr(b, bases.a, off)
        })
        .collect();
    let b_rows: Vec<Value> = (0..cols)
        .map(|c| {
            let jc = b.ins().iadd_imm_s(j0, c as i64);
            let off = b.ins().imul_imm_s(jc, spec.b_cs as i64);
            elem_addr(b, bases.b, off)
        })
        .collect();
    let zero_f = b.ins().f32const(0.0);
    let zero_v = b.ins().splat(types::F32X4, zero_f);
    let acc: Vec<Variable> = (0..rows * cols)
        .map(|_| {
            let var = b.declare_var(types::F32X4);
            b.def_var(var, zero_v);
            var
        })
        .collect();
    let k4 = iconst(b, (spec.k / 4 * 4) as i64);
    let z = iconst(b, 0);
    counted_loop(b, z, k4, 4, |b, k| {
        let av: Vec<Value> = a_rows
            .iter()
            .map(|&row| {
                let p = elem_addr(b, row, k);
                b.ins().load(types::F32X4, mem(), p, 0)
            })
            .collect();
        let bv: Vec<Value> = b_rows
            .iter()
            .map(|&row| {
                let p = elem_addr(b, row, k);
                b.ins().load(types::F32X4, mem(), p, 0)
            })
            .collect();
        for (r, x) in av.iter().enumerate() {
            for (c, y) in bv.iter().enumerate() {
                let var = acc[r * cols + c];
                let old = b.use_var(var);
                let new = b.ins().fma(*x, *y, old);
                b.def_var(var, new);
            }
        }
        Ok(())
    })?;
    let kk = iconst(b, spec.k as i64);
    for r in 0..rows {
        for c in 0..cols {
            let v = b.use_var(acc[r * cols + c]);
            let l: Vec<Value> = (0..4u8).map(|l| b.ins().extractlane(v, l)).collect();
            let s01 = b.ins().fadd(l[0], l[1]);
            let s23 = b.ins().fadd(l[2], l[3]);
            let s = b.ins().fadd(s01, s23);
            let sum = b.declare_var(types::F32);
            b.def_var(sum, s);
            let (a_row, b_row) = (a_rows[r], b_rows[c]);
            counted_loop(b, k4, kk, 1, |b, k| {
                let pa = elem_addr(b, a_row, k);
                let pb = elem_addr(b, b_row, k);
                let x = b.ins().load(types::F32, mem(), pa, 0);
                let y = b.ins().load(types::F32, mem(), pb, 0);
                let old = b.use_var(sum);
                let new = b.ins().fma(x, y, old);
                b.def_var(sum, new);
                Ok(())
            })?;
            let s = b.use_var(sum);
            let ir = b.ins().iadd_imm_s(i, r as i64);
            let jc = b.ins().iadd_imm_s(j0, c as i64);
            store_c(b, spec, bases, ir, jc, s);
        }
    }
    Ok(())
}
