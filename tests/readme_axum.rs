//! The README's "Gate an HTTP API" block, compiled. The README marks it
//! `ignore` (the default doctest build has no `tower` feature); this file
//! holds the same lines, and `the_readme_block_is_this_code` fails when the
//! two drift apart.

#[rustfmt::skip] // The lines must stay as the README has them.
async fn readme_wiring() -> Result<(), Box<dyn std::error::Error>> {
    // README-BEGIN
    use std::sync::Arc;
    use axum::{routing::post, Router};
    use http::Method;
    use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
    use tollgate::{Allocation, Catalog, Engine};

    let catalog: Catalog = toml::from_str(&std::fs::read_to_string("examples/takos_plans.toml")?)?;
    let engine = Arc::new(Engine::new(catalog));
    engine.allocate(Allocation::new("user-1", "plan_free"))?;

    let search = Route::new(Method::POST, "/api/spaces/{id}/search*").consumes("vector_search_count", 1);
    let quota = QuotaLayer::new(engine, SubjectSource::header("x-api-key"), Routes::new().route(search))?;

    let app: Router = Router::new()
        .route("/api/spaces/{id}/search", post(|| async { "results" }))
        .layer(quota);
    axum::serve(tokio::net::TcpListener::bind("127.0.0.1:3000").await?, app).await?;
    // README-END
    Ok(())
}

/// The lines between the markers above, without their indent.
fn this_block() -> Vec<String> {
    let source = include_str!("readme_axum.rs");
    let start = source.find("// README-BEGIN\n").expect("begin marker") + 16;
    let end = source.find("    // README-END").expect("end marker");
    source[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned())
        .collect()
}

fn readme_block() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Gate an HTTP API").expect("README section")..];
    let start = section.find("```rust,ignore\n").expect("the block") + 15;
    let end = start + section[start..].find("```").expect("block end");
    section[start..end].lines().map(str::to_owned).collect()
}

#[test]
fn the_readme_block_is_this_code() {
    let block = this_block();
    assert!(block.len() > 10, "the markers hold the block: {block:?}");
    assert_eq!(readme_block(), block);
}

#[test]
fn the_readme_wiring_builds_a_future() {
    // Compiling this call is the point: running it would serve on port 3000.
    let future = readme_wiring();
    drop(future);
}
