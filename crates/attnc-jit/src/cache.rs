//! A cache of compiled kernels keyed by (IR fingerprint, bindings, options, CPU features).
//!
//! ```no_run
//! # fn demo(kernel: &attnc_ir::Kernel, bindings: &attnc_ir::Bindings) -> attnc_jit::Result<()> {
//! use attnc_jit::cache::KernelCache;
//! let cache = KernelCache::new();
//! let a = cache.get_or_compile(kernel, bindings, &Default::default())?;
//! let b = cache.get_or_compile(kernel, bindings, &Default::default())?; // no recompilation
//! assert!(std::sync::Arc::ptr_eq(&a, &b));
//! # Ok(()) }
//! ```

use crate::error::{JitError, Result};
use crate::jit::cpu_features;
use crate::runtime::{CompileOptions, CompiledKernel};
use attnc_ir::{Bindings, Kernel};
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// What identifies a compiled kernel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The IR, printed canonically ([`fingerprint`]).
    pub fingerprint: String,
    /// The bound dimension symbols.
    pub bindings: Vec<(String, u64)>,
    /// The compile options.
    pub options: CompileOptions,
    /// The host CPU features Cranelift compiles for.
    pub cpu: String,
}

/// A canonical text of `kernel`'s IR: parameters, every node (op, shape, dtype, operands),
/// output and return type. Spans are left out, so the same program at another place in a
/// file has the same fingerprint.
pub fn fingerprint(kernel: &Kernel) -> String {
    let mut s = String::new();
    let _ = write!(s, "kernel {}(", kernel.name);
    for p in &kernel.params {
        let _ = write!(
            s,
            "{}: {}{}, ",
            p.name,
            p.dtype.keyword(),
            attnc_ir::dim::format_shape(&p.shape)
        );
    }
    let _ = writeln!(s, ") -> {}", kernel.ret_dtype.keyword());
    for id in kernel.graph.topo_order() {
        let node = kernel.graph.node(id);
        let ops: Vec<String> = kernel
            .graph
            .operands(id)
            .iter()
            .map(|o| format!("%{}", o.index()))
            .collect();
        let _ = writeln!(
            s,
            "%{} = {} ({}) : {}{}",
            id.index(),
            node.op,
            ops.join(", "),
            node.dtype.keyword(),
            attnc_ir::dim::format_shape(&node.shape)
        );
    }
    let _ = writeln!(s, "return %{}", kernel.output.index());
    s
}

/// The cache key of compiling `kernel` at `bindings` with `options` on this CPU.
pub fn cache_key(kernel: &Kernel, bindings: &Bindings, options: &CompileOptions) -> CacheKey {
    CacheKey {
        fingerprint: fingerprint(kernel),
        bindings: bindings.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        options: options.clone(),
        cpu: cpu_features(),
    }
}

/// Compiled kernels shared across threads; compiled once per key.
#[derive(Default)]
pub struct KernelCache {
    map: Mutex<HashMap<CacheKey, Arc<CompiledKernel>>>,
}

impl KernelCache {
    /// An empty cache.
    pub fn new() -> KernelCache {
        KernelCache::default()
    }

    /// The cached kernel for this key, compiling it on a miss. Compilation runs outside the
    /// lock; when two threads race on one key, the first inserted kernel wins.
    pub fn get_or_compile(
        &self,
        kernel: &Kernel,
        bindings: &Bindings,
        options: &CompileOptions,
    ) -> Result<Arc<CompiledKernel>> {
        let key = cache_key(kernel, bindings, options);
        if let Some(hit) = self.lock()?.get(&key) {
            return Ok(Arc::clone(hit));
        }
        let compiled = Arc::new(CompiledKernel::compile(kernel, bindings, options)?);
        Ok(Arc::clone(self.lock()?.entry(key).or_insert(compiled)))
    }

    /// The number of cached kernels.
    pub fn len(&self) -> usize {
        self.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every cached kernel (their machine code is freed once no caller holds them).
    pub fn clear(&self) {
        if let Ok(mut m) = self.lock() {
            m.clear();
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<CompiledKernel>>>> {
        self.map.lock().map_err(|_| JitError::Unsupported {
            what: "kernel cache lock poisoned".to_string(),
        })
    }
}
