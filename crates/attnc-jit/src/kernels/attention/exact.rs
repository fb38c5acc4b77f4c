//! The exact (f32) fused attention kernel: tile steps, online softmax and the stores of its
//! rows, over the shared [`super::skeleton`].
//!
//! Layout of the generated function, per call (one batch entry, a range of query rows):
//!
//! ```text
//! entry:       clamp rows, batch multi-index → base pointers of Q, K, V, biases, output
//! group_head:  a query tile of QUERY_TILE rows: Q row pointers, per-row mask bounds and
//!              bias rows; m = -inf, l = 0 (one lane per row), O = 0 (stack slot)
//! run_head:    for each run of key tiles listed for this query tile in the compile-time table
//!   body:        loop over the run's key tiles; the element mask from the pattern applies
//!                only in partial runs (a runtime flag when the table has both kinds, so the
//!                tile code is generated once)
//!   tail:        the last, short key tile (n mod 8 keys), full or partial
//! group_fin:   out_i = O_i / l_i (0 where l_i = 0) for the rows inside [row_begin, row_end)
//! ```
//!
//! A key tile is [`KEY_TILE`] = 8 keys; a query tile is [`QUERY_TILE`] = 4 rows, which share
//! every K and V load. One tile step (see `Emitter::tile`) is register-blocked for the 16 xmm
//! registers: Q·Kᵀ as 2 rows × 4 keys of f32x4 partial dot products (8 accumulators, 6 loads
//! per 8 FMAs) reduced by [`hsum4`]; score expression and mask on row vectors; a 4 × 4
//! transpose to one vector per key with a lane per row, so the online softmax (maximum, sum,
//! rescale test, one `exp` per key) works on all 4 rows at once; P·V over chunks of 12 output
//! lanes (4 rows × 3 f32x4 accumulators, loaded from and stored to the `O` stack slot) with
//! one broadcast load of `p` per FMA. The function is compiled without Cranelift's e-graph
//! pass so that this schedule survives (see [`define_in_order`]): at d = dv = 64 a tile step
//! is about 1,000 FMAs in roughly 3,000 instructions, with a few dozen spill moves at most.
//!
//! Query tiles are aligned to absolute row indices (tile `g` is rows `4g .. 4g + 4`) and
//! always compute all their rows (rows past `m - 1` duplicate row `m - 1`; with `m < 4` only
//! `m` rows are computed), storing only the rows of the call's range: every row is computed
//! by the same instructions whatever range a call covers, so results are bit-identical under
//! any split. Code size is bounded: O(tile bodies × (d + dv)), independent of m and n; the
//! sparsity lives in the data table.

use super::score::Masking;
use super::skeleton::{
    define_with_table, elem_size, max_shift, mem, Bases, CallParams, Codegen, DefinedAttention,
    Emitter, QueryTile, Row, Skeleton,
};
use super::spec::{AttentionSpec, KEY_TILE, KEY_VECS, QUERY_TILE};
use crate::error::Result;
use crate::simd::{
    const_i32x4, emit_exp_nonpos, hsum4, select_f32, shuffle_f32x4, splat_f32, transpose4,
};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    Block, GlobalValue, InstBuilder, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_frontend::FunctionBuilder;
use cranelift_jit::JITModule;
use std::collections::BTreeSet;

/// f32x4 of the value width per P·V chunk (`QUERY_TILE × PV_VECS` accumulators in registers).
const PV_VECS: usize = 3;

/// Defines the exact kernel of `spec` as `name` (see [`super::define_attention`]).
pub(super) fn define_exact(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    codegen: Codegen,
) -> Result<DefinedAttention> {
    define_with_table(
        module,
        spec,
        name,
        (KEY_TILE, codegen),
        |b, ptr, table_gv, kinds| {
            emit_body(b, spec, ptr, table_gv, kinds);
            Ok(())
        },
    )
}

impl Emitter<'_> {
    /// One key tile `t` (i64) with `count` valid keys for every row of the query tile;
    /// `masking` says whether the element mask applies.
    ///
    /// Scores: rows in pairs, keys in fours; per depth chunk two q chunks and four K chunks
    /// are loaded into registers and feed eight f32x4 accumulators (each a partial dot
    /// product, summed horizontally at the end: [`hsum4`] gives a row's four scores). The
    /// score expression and the element mask run on these row vectors; a 4 × 4 transpose then
    /// gives one vector per key with a lane per query row, the layout of the online softmax
    /// (running maximum and sum are one vector each for the whole query tile). The
    /// probabilities go to the `P` stack slot, and P·V runs over the value width in chunks of
    /// `4 · PV_VECS` lanes: the rows' accumulators are loaded from the `O` stack slot, every
    /// key adds `p[r, j] · V[j, chunk]` (V chunks shared by the rows, one broadcast load of
    /// `p` per FMA), and they are stored back.
    fn tile(
        &self,
        b: &mut FunctionBuilder,
        bases: &Bases,
        rows: &[Row],
        t: Value,
        masking: Masking,
        count: usize,
    ) {
        let spec = self.spec;
        let qrows = self.qrows;
        let j0 = b.ins().imul_imm_s(t, KEY_TILE as i64);
        let kes = elem_size(spec.k.dtype);
        let qes = elem_size(spec.q.dtype);
        let ves = elem_size(spec.v.dtype);
        // The tile's first K and V rows; key `l` of the tile is at a constant offset from them.
        let k_tile = self.row_ptr(b, &spec.k, bases.k, j0);
        let v_tile = self.row_ptr(b, &spec.v, bases.v, j0);
        let k_row = spec.k.row_stride as i64 * kes;
        let v_row = spec.v.row_stride as i64 * ves;
        let zero = splat_f32(b, 0.0);
        // Raw scores, row layout: dots[r][h] holds keys 4h..4h+4 of row r.
        let mut dots: Vec<Vec<Value>> = vec![Vec::with_capacity(KEY_VECS); qrows];
        for h in 0..KEY_VECS {
            let keys: Vec<usize> = ((4 * h).min(count)..(4 * h + 4).min(count)).collect();
            for pair in (0..qrows).collect::<Vec<_>>().chunks(2) {
                let mut acc: Vec<Vec<Value>> = vec![Vec::new(); pair.len()];
                for c in 0..self.d4 {
                    let cnt = (spec.d - 4 * c).min(4);
                    let kv: Vec<Value> = keys
                        .iter()
                        .map(|&l| {
                            let p = b
                                .ins()
                                .iadd_imm_s(k_tile, l as i64 * k_row + 4 * c as i64 * kes);
                            self.load_lanes(b, p, cnt, spec.k.dtype)
                        })
                        .collect();
                    for (pi, (a, &r)) in acc.iter_mut().zip(pair).enumerate() {
                        let p = b.ins().iadd_imm_s(rows[r].q, 4 * c as i64 * qes);
                        let q = self.load_lanes(b, p, cnt, spec.q.dtype);
                        let last_row = pi + 1 == pair.len();
                        for (l, &k) in kv.iter().enumerate() {
                            if c == 0 {
                                // AVX multiplies are non-destructive: no copies.
                                a.push(b.ins().fmul(q, k));
                            } else if last_row {
                                // x64 FMA overwrites its first operand: make it the value
                                // whose last use this is, so no copy is needed.
                                a[l] = b.ins().fma(k, q, a[l]);
                            } else {
                                a[l] = b.ins().fma(q, k, a[l]);
                            }
                        }
                    }
                }
                for (a, &r) in acc.iter().zip(pair) {
                    let s = if keys.is_empty() || a.is_empty() {
                        zero
                    } else {
                        let at = |l: usize| a.get(l).copied().unwrap_or(zero);
                        hsum4(b, at(0), at(1), at(2), at(3))
                    };
                    dots[r].push(s);
                }
            }
        }
        let j32 = b.ins().ireduce(I32, j0);
        let jv = b.ins().splat(I32X4, j32);
        // Score expression, row layout; `keys[r][h]` are the key indices of `scores[r][h]`.
        let mut scores: Vec<Vec<Value>> = Vec::with_capacity(QUERY_TILE);
        let mut keys: Vec<Vec<Value>> = Vec::with_capacity(QUERY_TILE);
        for (r, row) in rows.iter().enumerate().take(qrows) {
            let mut list = Vec::with_capacity(KEY_VECS);
            let mut js = Vec::with_capacity(KEY_VECS);
            for (h, &raw) in dots[r].iter().enumerate() {
                let cnt = count.saturating_sub(4 * h).min(4);
                if cnt == 0 {
                    break;
                }
                let lanes = const_i32x4(b, std::array::from_fn(|l| (4 * h + l) as i32));
                let jh = b.ins().iadd(jv, lanes);
                let j0h = b.ins().iadd_imm_s(j0, 4 * h as i64);
                list.push(self.score(b, &spec.score, raw, row, j0h, jh, cnt));
                js.push(jh);
            }
            scores.push(list);
            keys.push(js);
        }
        self.apply_mask(b, rows, &keys, &mut scores, masking);
        // Rows past the tile's real rows (m < QUERY_TILE) repeat the last one.
        while scores.len() < QUERY_TILE {
            let last = scores[qrows - 1].clone();
            scores.push(last);
        }
        // Transpose: cols[k] = scores of key k for the QUERY_TILE rows (lane = row).
        let mut cols: Vec<Value> = Vec::with_capacity(count);
        for (h, &first) in scores[0].iter().enumerate() {
            let cnt = count.saturating_sub(4 * h).min(4);
            let t = transpose4(b, first, scores[1][h], scores[2][h], scores[3][h]);
            cols.extend_from_slice(&t[..cnt]);
        }
        self.online_update(b, &cols);
        // P·V.
        let p_ptr = b.ins().stack_addr(I64, self.p_slot, 0);
        let chunks = self.dv4.div_ceil(PV_VECS);
        for ch in 0..chunks {
            let vecs: Vec<usize> = (PV_VECS * ch..(PV_VECS * ch + PV_VECS).min(self.dv4)).collect();
            let mut acc: Vec<Vec<Value>> = (0..qrows)
                .map(|r| {
                    vecs.iter()
                        .map(|&c| {
                            b.ins()
                                .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c))
                        })
                        .collect()
                })
                .collect();
            for k in 0..count {
                let vv: Vec<Value> = vecs
                    .iter()
                    .map(|&c| {
                        let cnt = (spec.dv - 4 * c).min(4);
                        let p = b
                            .ins()
                            .iadd_imm_s(v_tile, k as i64 * v_row + 4 * c as i64 * ves);
                        self.load_lanes(b, p, cnt, spec.v.dtype)
                    })
                    .collect();
                for (r, a) in acc.iter_mut().enumerate() {
                    for (slot, &v) in a.iter_mut().zip(&vv) {
                        // One broadcast load per FMA: used once, it folds into a
                        // `vbroadcastss` from memory, and the FMA may overwrite it (x64 FMA
                        // overwrites its first operand).
                        let x = b.ins().load(F32, mem(), p_ptr, (16 * k + 4 * r) as i32);
                        let pb = b.ins().splat(F32X4, x);
                        *slot = b.ins().fma(pb, v, *slot);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (&c, &v) in vecs.iter().zip(a) {
                    b.ins().stack_store(I64, v, self.o_slot, self.o_off(r, c));
                }
            }
        }
    }

    /// Byte offset of accumulator chunk `c` of row `r` in the `O` stack slot.
    fn o_off(&self, r: usize, c: usize) -> i32 {
        (16 * (r * self.dv4 + c)) as i32
    }

    /// The online-softmax step of the query tile for key columns `cols` (lane = row, masked
    /// entries `-inf`): updates the running maximum and sum, rescales the accumulators when
    /// some row's maximum changed, and stores `p = e^(s - m)` of key `k` at `16 k` in the `P`
    /// slot.
    fn online_update(&self, b: &mut FunctionBuilder, cols: &[Value]) {
        let m_old = b.use_var(self.m_var);
        // A tree of maxima (short dependency chains; any order gives the same maximum, up to
        // the sign of a zero, which no result depends on).
        let tile_max = tree(b, cols, max_shift);
        let m_new = match tile_max {
            Some(t) => max_shift(b, t, m_old),
            None => m_old,
        };
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let zero = splat_f32(b, 0.0);
        // While every score so far is -inf, subtract 0 instead (e^(-inf - 0) = 0, no NaN).
        let none = b.ins().fcmp(FloatCC::Equal, m_new, ninf);
        let m_use = select_f32(b, none, zero, m_new);
        b.def_var(self.m_var, m_new);
        // Rescale l and acc by alpha = e^(m_old - m_new) only when some row's maximum changed
        // (or is NaN): alpha is exactly 1 in the other rows, so this changes no bit there.
        let same = b.ins().fcmp(FloatCC::Equal, m_old, m_new);
        let all_same = b.ins().vall_true(same);
        let rescale = b.create_block();
        let update = b.create_block();
        b.ins().brif(all_same, update, &[], rescale, &[]);
        b.switch_to_block(rescale);
        let da = b.ins().fsub(m_old, m_use);
        let alpha = emit_exp_nonpos(b, da);
        let l = b.use_var(self.l_var);
        let l = b.ins().fmul(l, alpha);
        b.def_var(self.l_var, l);
        for r in 0..self.qrows {
            let lane = r as u8;
            let a = shuffle_f32x4(b, alpha, alpha, [lane; 4]);
            for c in 0..self.dv4 {
                let x = b
                    .ins()
                    .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c));
                let x = b.ins().fmul(x, a);
                b.ins().stack_store(I64, x, self.o_slot, self.o_off(r, c));
            }
        }
        b.ins().jump(update, &[]);
        b.switch_to_block(update);
        let mut probs = Vec::with_capacity(cols.len());
        for (k, &x) in cols.iter().enumerate() {
            let ds = b.ins().fsub(x, m_use);
            let e = emit_exp_nonpos(b, ds);
            b.ins().stack_store(I64, e, self.p_slot, (16 * k) as i32);
            probs.push(e);
        }
        if let Some(sum) = tree(b, &probs, |b, x, y| b.ins().fadd(x, y)) {
            let l = b.use_var(self.l_var);
            let l = b.ins().fadd(l, sum);
            b.def_var(self.l_var, l);
        }
    }

    /// Writes the running maximum and sum of query-tile row `r` as the f32 pair `i` at
    /// `stats_row0`: the log-sum-exp is `m + ln(l)` (the host forms it; `l = 0` marks a
    /// fully masked row), so it costs no pass over the scores.
    fn store_stats(&self, b: &mut FunctionBuilder, r: usize, stats_row0: Value, i: Value) {
        let m = b.use_var(self.m_var);
        let l = b.use_var(self.l_var);
        let m = b.ins().extractlane(m, r as u8);
        let l = b.ins().extractlane(l, r as u8);
        let p = self.offset(b, stats_row0, i, 8);
        b.ins().store(mem(), m, p, 0);
        b.ins().store(mem(), l, p, 4);
    }

    /// Writes `acc / l` of query-tile row `r` to output row `i` (zeros where `l = 0`).
    fn store_row(&self, b: &mut FunctionBuilder, r: usize, out_row0: Value, i: Value) {
        let spec = self.spec;
        let l = b.use_var(self.l_var);
        let lsum = b.ins().extractlane(l, r as u8);
        let lv = b.ins().splat(F32X4, lsum);
        let zero = splat_f32(b, 0.0);
        let empty = b.ins().fcmp(FloatCC::Equal, lv, zero);
        let op = self.offset(b, out_row0, i, (spec.dv * 4) as i64);
        for c in 0..self.dv4 {
            let acc = b
                .ins()
                .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c));
            let y = b.ins().fdiv(acc, lv);
            let y = select_f32(b, empty, zero, y);
            let cnt = (spec.dv - 4 * c).min(4);
            if cnt == 4 {
                b.ins().store(mem(), y, op, (16 * c) as i32);
            } else {
                for lane in 0..cnt {
                    let x = b.ins().extractlane(y, lane as u8);
                    b.ins().store(mem(), x, op, (16 * c + 4 * lane) as i32);
                }
            }
        }
    }
}

/// Combines `xs` pairwise in a balanced tree (`None` when empty).
fn tree(
    b: &mut FunctionBuilder,
    xs: &[Value],
    f: impl Fn(&mut FunctionBuilder, Value, Value) -> Value + Copy,
) -> Option<Value> {
    match xs.len() {
        0 => None,
        1 => Some(xs[0]),
        n => {
            let (lo, hi) = xs.split_at(n.div_ceil(2));
            let x = tree(b, lo, f)?;
            match tree(b, hi, f) {
                Some(y) => Some(f(b, x, y)),
                None => Some(x),
            }
        }
    }
}

fn emit_body(
    b: &mut FunctionBuilder,
    spec: &AttentionSpec,
    ptr: Type,
    table_gv: GlobalValue,
    kinds: &BTreeSet<u32>,
) {
    let dv4 = spec.dv.div_ceil(4);
    let slot = |b: &mut FunctionBuilder, bytes: usize| {
        let size = u32::try_from(bytes.max(16)).unwrap_or(u32::MAX);
        b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4))
    };
    let em = Emitter {
        spec,
        d4: spec.d.div_ceil(4),
        dv4,
        qrows: QUERY_TILE.min(spec.m).max(1),
        m_var: b.declare_var(F32X4),
        l_var: b.declare_var(F32X4),
        o_slot: slot(b, 16 * QUERY_TILE * dv4),
        p_slot: slot(b, 16 * KEY_TILE),
    };
    let k = Skeleton::new(b);
    let (group_head, run_head, run_body, run_next, group_fin, exit) = (
        k.group_head,
        k.run_head,
        k.run_body,
        k.run_next,
        k.group_fin,
        k.exit,
    );

    // entry: bases and row range.
    b.switch_to_block(k.entry);
    let call = CallParams::read(b, spec, k.entry);
    let (out, bidx, rb, re) = (call.out, call.bidx, call.rb, call.re);
    let bases = Bases {
        q: call.base_of(b, ptr, &spec.q),
        k: call.base_of(b, ptr, &spec.k),
        v: call.base_of(b, ptr, &spec.v),
        biases: spec
            .biases
            .iter()
            .map(|t| call.base_of(b, ptr, t))
            .collect(),
    };
    let out_row0 = em.offset(b, out, bidx, (spec.m * spec.dv * 4) as i64);
    // The row statistics (max, sum) of this batch entry, after every output row.
    let stats_row0 = spec.lse.then(|| {
        let base = b.ins().iadd_imm_s(out, (spec.stats_offset() * 4) as i64);
        em.offset(b, base, bidx, (spec.m * 8) as i64)
    });
    let (table, runs_base) = k.enter_groups(b, spec, (ptr, table_gv), (rb, re));

    // group_head(g): rows i0 .. i0 + QUERY_TILE, clamped to m - 1 (a duplicate row is
    // computed but not stored), so every row is computed the same way whatever the range.
    let (g, i0, last) = k.group_head(b, spec);
    let rows: Vec<Row> = (0..em.qrows)
        .map(|k| {
            let i = b.ins().iadd_imm_s(i0, k as i64);
            let i = b.ins().umin(i, last);
            em.row(b, &bases, i)
        })
        .collect();
    let ninf = splat_f32(b, f32::NEG_INFINITY);
    let zero = splat_f32(b, 0.0);
    b.def_var(em.m_var, ninf);
    b.def_var(em.l_var, zero);
    for r in 0..em.qrows {
        for c in 0..dv4 {
            b.ins().stack_store(I64, zero, em.o_slot, em.o_off(r, c));
        }
    }
    // run_head(r): while r < r_end; run_body: dispatch on the kind of run r.
    let run = em.iterate_runs(b, (table, runs_base), g, (run_head, run_body, group_fin));
    let (r, first, end, kind) = (run.index, run.first, run.end, run.kind);
    // One tile body per key-tile length (full tiles, the short last tile); a body serves
    // both its full and its partial runs through a runtime flag when the table has both.
    let tail_count = spec.n % KEY_TILE;
    let bodies: Vec<(bool, Masking, Block)> = [false, true]
        .into_iter()
        .filter_map(|tail| {
            let kind = |masked: bool| u32::from(masked) + 2 * u32::from(tail);
            let (full, partial) = (kinds.contains(&kind(false)), kinds.contains(&kind(true)));
            let blk = b.create_block();
            b.append_block_param(blk, I64);
            b.append_block_param(blk, I32);
            let masking = match (full, partial) {
                (false, false) => return None,
                (true, false) => Masking::Off,
                (false, true) => Masking::On,
                (true, true) => Masking::Flag(b.block_params(blk)[1]),
            };
            Some((tail, masking, blk))
        })
        .collect();
    // Kinds: bit 0 = partial (the mask applies), bit 1 = the short last tile.
    let flag = b.ins().band_imm_s(kind, 1);
    match bodies.as_slice() {
        [] => {
            b.ins().jump(run_next, &[]);
        }
        [(_, _, only)] => {
            b.ins().jump(*only, &[first.into(), flag.into()]);
        }
        [(_, _, full), (_, _, tail), ..] => {
            let is_tail = b
                .ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, kind, 2);
            b.ins().brif(
                is_tail,
                *tail,
                &[first.into(), flag.into()],
                *full,
                &[first.into(), flag.into()],
            );
        }
    }
    for &(tail, masking, blk) in &bodies {
        b.switch_to_block(blk);
        let t = b.block_params(blk)[0];
        let flag = b.block_params(blk)[1];
        let count = if tail { tail_count } else { KEY_TILE };
        em.tile(b, &bases, &rows, t, masking, count);
        if tail {
            b.ins().jump(run_next, &[]);
        } else {
            let t1 = b.ins().iadd_imm_s(t, 1);
            let again = b.ins().icmp(IntCC::UnsignedLessThan, t1, end);
            let cont = b.create_block();
            b.ins().brif(again, cont, &[], run_next, &[]);
            b.switch_to_block(cont);
            b.ins().jump(blk, &[t1.into(), flag.into()]);
        }
    }

    // run_next
    b.switch_to_block(run_next);
    let r1 = b.ins().iadd_imm_s(r, 1);
    b.ins().jump(run_head, &[r1.into()]);

    // group_fin: out_i = acc / l (zeros where l = 0) for the rows in [row_begin, row_end).
    b.switch_to_block(group_fin);
    let tile = QueryTile {
        g,
        i0,
        rows: em.qrows,
    };
    tile.finish(b, (rb, re), (group_head, exit), |b, r, i| {
        em.store_row(b, r, out_row0, i);
        if let Some(stats) = stats_row0 {
            em.store_stats(b, r, stats, i);
        }
    });
}
