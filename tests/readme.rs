//! The README states facts the code defines: they are checked here so the two cannot drift.

use orwcfm_fast::commands::runconfig::{preset, resolve};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The paragraph that starts with `start`, its lines joined by spaces.
fn paragraph(text: &str, start: &str) -> String {
    let lines: Vec<&str> = text.lines().skip_while(|l| !l.starts_with(start)).take_while(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "README has no paragraph starting with {start:?}");
    lines.join(" ")
}

/// The number right after the first occurrence of `key` in `text` (at or after `from`).
fn num_after(text: &str, from: &str, key: &str) -> f64 {
    let text = &text[text.find(from).unwrap_or_else(|| panic!("README paragraph lacks {from:?}: {text}"))..];
    let rest = &text[text.find(key).unwrap_or_else(|| panic!("README paragraph lacks {key:?} after {from:?}: {text}")) + key.len()..];
    let tok: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '-' | '+')).collect();
    let tok = tok.trim_end_matches(['.', '-', '+', 'e']);
    tok.parse().unwrap_or_else(|e| panic!("{key:?}: cannot parse {tok:?} ({e}) in {rest:.40}"))
}

#[test]
fn the_preset_paragraph_states_the_presets_values() {
    let p = paragraph(&readme(), "**How the preset differs from the full-size setting.**");
    let (m, prod) = resolve(None, serde_json::Map::new()).unwrap();
    assert_eq!(m, preset("mnist-even").unwrap());
    let mnist = "mnist-even uses";
    assert_eq!(num_after(&p, mnist, "lr ") as f32, m.learning_rate, "mnist-even learning_rate");
    assert_eq!(num_after(&p, mnist, "with ") as u64, m.warmup_steps, "mnist-even warmup_steps");
    assert_eq!(num_after(&p, mnist, "α ") as f32, m.w2_coefficient, "mnist-even w2_coefficient");
    assert_eq!(num_after(&p, mnist, "τ ") as f32, m.temperature, "mnist-even temperature");
    assert!(p[p.find(mnist).unwrap()..].contains(&format!("`{}` weights", m.weight_mode)), "mnist-even weight_mode {}", m.weight_mode);
    assert!(p[p.find(mnist).unwrap()..].contains(&format!("{} coupling", m.coupling)), "mnist-even coupling {}", m.coupling);
    assert_eq!(num_after(&p, mnist, "coupling, ") as usize, m.ode_steps, "mnist-even ode_steps");
    assert!(p[p.find(mnist).unwrap()..].contains(&format!("steps of the {} solver", m.ode_solver)), "mnist-even ode_solver {}", m.ode_solver);
    assert_eq!(num_after(&p, mnist, "batches of ") as usize, m.batch_size, "mnist-even batch_size");
    assert_eq!(num_after(&p, mnist, "used for ") as usize, m.sample_reuse, "mnist-even sample_reuse");
    assert_eq!(num_after(&p, mnist, "(`sample_reuse`), ") as u64, m.num_epochs, "mnist-even num_epochs");
    assert_eq!(num_after(&p, mnist, "epochs × ") as u64, m.steps_per_epoch, "mnist-even steps_per_epoch");
    assert_eq!(num_after(&p, mnist, ", and ") as usize, prod.eval_samples, "eval_samples");
    assert_eq!(num_after(&p, mnist, "evaluation samples every ") as u64, prod.eval_every, "eval_every");

    let o = preset("paper").unwrap();
    let paper = "(`--preset paper`:";
    assert_eq!(num_after(&p, paper, "lr ") as f32, o.learning_rate, "paper learning_rate");
    assert_eq!(num_after(&p, paper, "warm-up ") as u64, o.warmup_steps, "paper warmup_steps");
    assert_eq!(num_after(&p, paper, "α ") as f32, o.w2_coefficient, "paper w2_coefficient");
    assert_eq!(num_after(&p, paper, "τ ") as f32, o.temperature, "paper temperature");
    let after_paper = p[p.find(paper).unwrap()..].to_lowercase();
    assert!(after_paper.contains(&format!("{} coupling", o.coupling)) && after_paper.contains(&format!("raw `{}` weights", o.weight_mode)), "paper coupling {} / weight_mode {}", o.coupling, o.weight_mode);
    assert_eq!(num_after(&p, paper, "Euler on a ") as usize, o.ode_steps + 1, "paper ode_steps (points of the grid)");
    assert_eq!(num_after(&p, paper, "grid, ") as u64, o.num_epochs, "paper num_epochs");
    assert_eq!(num_after(&p, paper, "epochs × ") as u64, o.steps_per_epoch, "paper steps_per_epoch");
}

/// Every command line of the README (a line starting `orwcfm-fast `) is inside a fenced block,
/// and every fence is closed.
#[test]
fn command_lines_are_inside_code_blocks() {
    let mut open = false;
    for (i, l) in readme().lines().enumerate() {
        if l.trim_start().starts_with("```") {
            open = !open;
        } else if l.starts_with("orwcfm-fast ") {
            assert!(open, "README line {}: a command outside a code block: {l}", i + 1);
        }
    }
    assert!(!open, "README ends inside a code block");
}
