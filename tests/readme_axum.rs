//! The README's "Gate an HTTP API" blocks, compiled: the memory wiring, and
//! (feature `redis`) the Redis one. The README marks them `ignore` (the
//! default doctest build has no `tower` feature); this file holds the same
//! lines, and `the_readme_blocks_are_this_code` fails when they drift apart.

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

#[cfg(feature = "redis")]
#[rustfmt::skip] // The lines must stay as the README has them.
async fn readme_redis_wiring() -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::Arc;
    use http::Method;
    use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
    use tollgate::{Allocation, Catalog, Engine};
    let catalog: Catalog = toml::from_str(&std::fs::read_to_string("examples/takos_plans.toml")?)?;
    let search = Route::new(Method::POST, "/api/spaces/{id}/search*").consumes("vector_search_count", 1);
    // README-REDIS-BEGIN
    use tollgate::store::RedisStore;
    use tollgate::SystemClock;

    let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
    let engine = Arc::new(Engine::with_store_and_clock(catalog, store, SystemClock));
    engine.allocate(Allocation::new("user-1", "plan_free"))?;
    let quota = QuotaLayer::new_async(engine, SubjectSource::header("x-api-key"), Routes::new().route(search))?;
    // README-REDIS-END
    drop(quota);
    Ok(())
}

/// The lines between the markers `name`-BEGIN and `name`-END above,
/// without their indent.
fn this_block(name: &str) -> Vec<String> {
    let source = include_str!("readme_axum.rs");
    let begin = format!("// {name}-BEGIN\n");
    let start = source.rfind(&begin).expect("begin marker") + begin.len();
    let end = source
        .rfind(&format!("    // {name}-END"))
        .expect("end marker");
    source[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned())
        .collect()
}

/// The `n`th `rust,ignore` block of the README's section.
fn readme_block(n: usize) -> Vec<String> {
    let readme = include_str!("../README.md");
    let mut section = &readme[readme.find("## Gate an HTTP API").expect("README section")..];
    for _ in 0..n {
        let start = section.find("```rust,ignore\n").expect("a block") + 15;
        section = &section[start + section[start..].find("```").expect("block end") + 3..];
    }
    let start = section.find("```rust,ignore\n").expect("the block") + 15;
    let end = start + section[start..].find("```").expect("block end");
    section[start..end].lines().map(str::to_owned).collect()
}

#[test]
fn the_readme_blocks_are_this_code() {
    for (n, name) in ["README", "README-REDIS"].into_iter().enumerate() {
        let block = this_block(name);
        assert!(block.len() > 5, "the markers hold the block: {block:?}");
        assert_eq!(readme_block(n), block, "{name}");
    }
}

#[test]
fn the_readme_wiring_builds_a_future() {
    // Compiling this call is the point: running it would serve on port 3000.
    let future = readme_wiring();
    drop(future);
    #[cfg(feature = "redis")]
    drop(readme_redis_wiring());
}
