//! `tollgate check`: every error with its field path, exit code 1 on error.

use std::path::PathBuf;
use std::process::{Command, Output};

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("the tollgate binary runs")
}

/// A file named `name` in a directory of this test's own, holding `text`.
fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_shipped_catalog_passes() {
    let o = tollgate(&["check", "examples/takos_plans.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ok (12 meters, 3 plans, 0 pools)"), "{out}");

    let o = tollgate(&["check", "examples/bench_plans.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (4 meters, 1 plans, 0 pools)"));
}

#[test]
fn every_validation_error_is_printed_with_its_field_path() {
    let path = file(
        "bad.json",
        r#"{"meters": [{"id": "tokens", "unit": "count"}, {"id": "tokens", "unit": "count"},
                   {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 20}}}],
            "plans": [
              {"id": "a", "limits": [{"meter": "nope", "window": {"calendar": {"period": "day"}}, "max": 5}]},
              {"id": "b", "limits": [{"meter": "tokens", "window": {"rolling": {"span": "1h", "buckets": 0}}, "max": 5}]},
              {"id": "a", "limits": []}],
            "pools": [{"id": "p", "limits": [{"meter": "tokens", "window": {"calendar": {"period": "day"}},
                                             "max": 1, "warn_at": "2"}]}]}"#,
    );
    let o = tollgate(&["check", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for field in [
        "meters[1].id: duplicate meter id `tokens`",
        "meters[2].unit.money.scale: scale 20 is above 12",
        "plans[a].limits[0].meter: limit for unknown meter `nope`",
        "plans[b].limits[0].window:",
        "plans[a].id: duplicate plan id `a`",
        "pools[p].limits[0].warn_at:",
        "6 errors",
    ] {
        assert!(err.contains(field), "missing `{field}` in:\n{err}");
    }
    assert!(o.stdout.is_empty());
}

#[test]
fn a_json_type_error_names_its_path() {
    let path = file(
        "float.json",
        r#"{"meters": [{"id": "t", "unit": "count"}], "plans": [{"id": "a", "limits":
            [{"meter": "t", "window": {"calendar": {"period": "day"}}, "max": 1.5}]}]}"#,
    );
    let o = tollgate(&["check", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("plans[0].limits[0].max:"), "{err}");
    assert!(err.contains("1 error"), "{err}");
}

#[test]
fn a_toml_error_names_its_path() {
    let path = file(
        "year.toml",
        "[[plans]]\nid = \"a\"\nlimits = [{ meter = \"t\", window = { calendar = { period = \"year\" } }, max = 1 }]\n",
    );
    let o = tollgate(&["check", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("plans[0].limits[0].window.calendar.period:"),
        "{err}"
    );
    assert!(err.contains("unknown variant `year`"), "{err}");
}

#[test]
fn a_missing_file_or_an_unknown_field_fails() {
    let o = tollgate(&["check", "/nonexistent/plans.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));

    let path = file("extra.json", r#"{"meters": [], "plans": [], "colour": 1}"#);
    let o = tollgate(&["check", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("colour"), "{}", stderr(&o));
}
