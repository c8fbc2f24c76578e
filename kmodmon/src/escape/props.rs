//! Property tests: whatever strings an event carries, no sink's output holds a control
//! character, a bidi control or another invisible character, or a quote that ends a field
//! early.
use proptest::prelude::*;

use super::is_unsafe;
use crate::event::{Clock, Container, Event, Kind};

/// Strings mixing arbitrary characters with the ones attackers use.
fn hostile() -> impl Strategy<Value = String> {
    let nasty = proptest::sample::select(vec![
        '\u{202e}',
        '\u{202a}',
        '\u{2066}',
        '\u{2069}',
        '\u{61c}',
        '\u{200b}',
        '\u{200f}',
        '\u{feff}',
        '\u{180e}',
        '\u{115f}',
        '\u{3164}',
        '\u{ffa0}',
        '\u{fe0f}',
        '\u{e0041}',
        '\u{e007f}',
        '\u{9b}',
        '\u{85}',
        '\x1b',
        '\x07',
        '\x00',
        '\n',
        '\r',
        '\t',
        '"',
        '\'',
        '\\',
        ',',
        '=',
        '+',
        '-',
        '@',
        '\u{ff1d}',
        '\u{ff20}',
        '{',
        '}',
        ':',
    ]);
    proptest::collection::vec(prop_oneof![any::<char>(), nasty], 0..24)
        .prop_map(|v| v.into_iter().collect())
}

fn event(s: [String; 8]) -> Event {
    let [module, params, path, comm, cgroup, name, detail, pod] = s;
    let mut e = Event::synthetic(Kind::LoadAttempt, &Clock::new());
    e.module = Some(module);
    e.params = Some(params);
    e.path = Some(path);
    e.comm = comm;
    e.cgroup_path = Some(cgroup);
    e.result = Some(-38);
    e.errno = Some("ENOSYS".into());
    e.detail = Some(detail);
    e.modules = vec![name.clone()];
    e.container = Some(Container {
        id: name.clone(),
        runtime: "docker".into(),
        name: Some(name),
        pod_name: Some(pod.clone()),
        pod_namespace: Some(pod),
        ..Default::default()
    });
    e
}

fn clean(out: &str, allowed: &[char]) -> Result<(), TestCaseError> {
    let bad = out.chars().find(|c| is_unsafe(*c) && !allowed.contains(c));
    prop_assert!(bad.is_none(), "{:?} in {out:?}", bad);
    Ok(())
}

/// Every string value of a JSON document.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(m) => m.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn json_lines_and_syslog_carry_no_unsafe_character(s in proptest::array::uniform8(hostile())) {
        let ev = event(s);
        let line = crate::sinks::json::line(&ev);
        clean(&line, &[])?;
        // Quotes inside values are escaped: the line parses back, field for field.
        let back: Event = serde_json::from_str(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &*super::sanitize_event(&ev));
        let msg = crate::sinks::syslog::format_message(
            crate::sinks::syslog::Facility::Daemon,
            crate::sinks::syslog::severity_for(&ev),
            std::time::SystemTime::now(),
            "host",
            "kmodmon",
            "1",
            ev.kind.as_str(),
            &crate::sinks::syslog::event_message(&ev),
        );
        clean(&msg, &[])?;
        let json = msg.split_once(" - ").map(|(_, j)| j).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut all = Vec::new();
        strings(&v, &mut all);
        for s in all {
            clean(&s, &[])?;
        }
    }

    #[test]
    fn human_lines_carry_no_unsafe_character_nor_a_bare_quote(s in proptest::array::uniform8(hostile())) {
        let ev = event(s);
        let line = crate::sinks::human::line(&ev, crate::sinks::human::Style { color: false });
        clean(&line, &[])?;
        // Quotes: only the two around params.
        let bare = line.matches('"').count();
        prop_assert!(bare == 2 || (bare == 0 && ev.params.as_deref().is_some_and(|p| p.trim().is_empty())), "{line}");
    }

    #[test]
    fn csv_rows_carry_no_unsafe_character_formula_or_broken_quote(s in proptest::array::uniform8(hostile())) {
        let ev = event(s);
        let row = crate::audit::export::csv_row(7, "ab", &ev);
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&row).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bytes = w.into_inner().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let text = String::from_utf8(bytes.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(text.ends_with('\n'));
        clean(&text[..text.len() - 1], &[])?;
        let mut r = csv::ReaderBuilder::new().has_headers(false).from_reader(bytes.as_slice());
        let back = r.records().next().and_then(Result::ok).ok_or_else(|| TestCaseError::fail("unreadable"))?;
        prop_assert_eq!(back.len(), row.len());
        for (cell, want) in back.iter().zip(&row) {
            prop_assert_eq!(cell, want.as_str());
            let formula = cell.starts_with(crate::audit::export::FORMULA_TRIGGERS);
            prop_assert!(!formula || cell.parse::<i64>().is_ok(), "formula cell {cell:?}");
        }
    }

    #[test]
    fn prometheus_labels_carry_no_unsafe_character_nor_a_bare_quote(v in hostile()) {
        let m = crate::metrics::Metrics::new();
        m.enrichment_miss(&v);
        m.drop_events(&v, 2);
        let text = m.render();
        clean(&text, &['\n'])?;
        for line in text.lines().filter(|l| !l.starts_with('#') && l.contains('{')) {
            // NAME{label="value"} N where value is (\\.|[^"\\])*
            let (_, rest) = line.split_once("=\"").ok_or_else(|| TestCaseError::fail(line.to_string()))?;
            let mut chars = rest.chars();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => { prop_assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}"); }
                    '"' => { closed = true; break; }
                    _ => {}
                }
            }
            prop_assert!(closed, "{line}");
            let tail: String = chars.collect();
            prop_assert!(tail.starts_with("} ") && tail[2..].parse::<u64>().is_ok(), "{line}");
        }
    }
}
