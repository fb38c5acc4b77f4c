mod common;
#[test]
fn dbg_shared() {
    let mut src = String::from("kernel shared(q: f32[n, d], k: f32[n, d], v: f32[n, d]) {\n let x = q;\n");
    for _ in 0..80 { src.push_str(" let x = x * x + x;\n"); }
    src.push_str(" return softmax(x @ k.T / sqrt(d)) @ v;\n}");
    let t = std::time::Instant::now();
    let kernel = common::kernel(&src);
    eprintln!("DEBUG lowered {:?}", t.elapsed());
    let expr = attnc_opt::convert::to_recexpr(&kernel).unwrap();
    eprintln!("DEBUG converted {:?} {}", t.elapsed(), expr.as_ref().len());
    let mut eg: egg::EGraph<attnc_opt::lang::Attn, attnc_opt::analysis::ShapeAnalysis> = egg::EGraph::new(Default::default()).with_explanations_enabled();
    eg.add_expr(&expr);
    eprintln!("DEBUG added {:?}", t.elapsed());
}
#[test]
fn dbg_rules() {
    let mut src = String::from("kernel shared(q: f32[n, d], k: f32[n, d], v: f32[n, d]) {\n let x = q;\n");
    for _ in 0..80 { src.push_str(" let x = x * x + x;\n"); }
    src.push_str(" return softmax(x @ k.T / sqrt(d)) @ v;\n}");
    let kernel = common::kernel(&src);
    let expr = attnc_opt::convert::to_recexpr(&kernel).unwrap();
    for spec in attnc_opt::rules::all_specs() {
        let t = std::time::Instant::now();
        let mut a = attnc_opt::analysis::ShapeAnalysis::default();
        a.bindings = common::bindings(&[("n", 4), ("d", 2)]);
        for p in ["q","k","v"] { a.params.insert(p.into(), vec![4, 2]); }
        let r: egg::Runner<attnc_opt::lang::Attn, attnc_opt::analysis::ShapeAnalysis> = egg::Runner::new(a).with_explanations_enabled().with_iter_limit(5).with_expr(&expr).run(&[spec.to_rewrite()]);
        eprintln!("DEBUG {} {:?} {:?}", spec.name, t.elapsed(), r.stop_reason);
    }
}
