//! Which kernel boots next, read the way the boot loader reads it:
//!
//! - GRUB (`/boot/grub/grub.cfg`, `/boot/grub2/grub.cfg`, an ESP's `EFI/*/grub.cfg`): the
//!   `menuentry`/`submenu` tree and `set default=`, with `next_entry` (one-shot, grub-reboot)
//!   and `saved_entry` (GRUB_DEFAULT=saved, grub-set-default) from the `grubenv` beside it;
//!   `blscfg` (Fedora, RHEL 8+) puts the Boot Loader Specification entries in the menu at that
//!   point, and their `$kernelopts` comes from grubenv.
//! - systemd-boot and other BLS loaders: `loader/entries/*.conf` (`version`, `linux`, `initrd`,
//!   `options`) on /boot, /boot/efi or /efi, `default` of `loader/loader.conf`, and the
//!   `LoaderEntryOneShot`/`LoaderEntryDefault` EFI variables where /sys/firmware is readable.
//! - Otherwise the newest module tree under /lib/modules.
//!
//! Every answer carries its source and a confidence (README "kmodmon check", next boot).
use std::collections::HashMap;

use serde::Serialize;

use super::Warning;
use super::cmdline::KernelCmdline;
use crate::escape::escape_bytes;
use crate::host::moddb::{self, RootFs};

/// GRUB configuration files, most specific first.
const GRUB_CFGS: [&str; 2] = ["/boot/grub2/grub.cfg", "/boot/grub/grub.cfg"];
/// Directories that hold the ESP's per-distribution GRUB configuration.
const ESP_EFI_DIRS: [&str; 2] = ["/boot/efi/EFI", "/efi/EFI"];
/// Where BLS entries live (the XBOOTLDR partition or /boot, then the ESP).
const BLS_DIRS: [&str; 3] = [
    "/boot/loader/entries",
    "/boot/efi/loader/entries",
    "/efi/loader/entries",
];
const LOADER_CONFS: [&str; 3] = [
    "/boot/loader/loader.conf",
    "/boot/efi/loader/loader.conf",
    "/efi/loader/loader.conf",
];
/// systemd-boot's vendor GUID for its EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
const EFIVARS: &str = "/sys/firmware/efi/efivars";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bootloader {
    Grub,
    /// systemd-boot or another loader of Boot Loader Specification entries.
    Bls,
    /// No boot loader configuration under the root.
    None,
}

/// What named the next kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NextSource {
    /// grubenv `next_entry` (grub-reboot: this boot only).
    GrubNextEntry,
    /// grubenv `saved_entry` with grub.cfg's `set default="${saved_entry}"`.
    GrubSavedEntry,
    /// grub.cfg `set default=` naming an entry.
    GrubDefault,
    /// GRUB's first entry: no default set, an empty saved_entry, or a default that names
    /// nothing (GRUB then boots entry 0).
    GrubFirstEntry,
    /// The EFI variable LoaderEntryOneShot (systemd-boot, this boot only).
    EfiOneShot,
    /// The EFI variable LoaderEntryDefault (systemd-boot, `bootctl set-default`).
    EfiDefault,
    /// `default` in loader.conf.
    LoaderConf,
    /// The BLS entry that sorts first (newest version): what systemd-boot boots without a
    /// default.
    BlsNewest,
    /// No boot loader configuration: the newest module tree installed.
    NewestInstalled,
    /// Not the next kernel: an installed one, judged because `--all-kernels` asked.
    Installed,
    /// Nothing found.
    None,
}

/// How sure the answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// A guess: no boot loader configuration, or one that names nothing that exists.
    Low,
    /// The loader's own rule (first entry, newest entry), with no explicit choice.
    Medium,
    /// An explicit choice in the loader's configuration resolved to one entry.
    High,
}

/// One bootable entry: a GRUB `menuentry` or a BLS entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MenuEntry {
    /// Shown title (escaped).
    pub title: String,
    /// `--id`/`$menuentry_id_option` of GRUB, the file name (less `.conf`) of a BLS entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Kernel release it boots, from BLS `version` or the kernel image's name (escaped when
    /// shown; kept as read for look-ups).
    #[serde(serialize_with = "escaped_opt")]
    pub version: Option<String>,
    /// Kernel image path as written.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "escaped_opt"
    )]
    pub linux: Option<String>,
    /// The kernel command line it passes (variables expanded where known; escaped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(serialize_with = "escaped_vec")]
    pub initrd: Vec<String>,
    /// "/boot/grub/grub.cfg:42" or "/boot/loader/entries/x.conf".
    pub origin: String,
    /// Variables in the command line that nothing defines (GRUB expands them to nothing).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "escaped_vec")]
    pub undefined_vars: Vec<String>,
    /// The command line unescaped, for parsing.
    #[serde(skip)]
    raw_cmdline: Option<String>,
}

/// Strings read from boot loader files, escaped where they are shown.
fn escaped_opt<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&escape_bytes(v.as_bytes())),
        None => s.serialize_none(),
    }
}

fn escaped_vec<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| escape_bytes(x.as_bytes())))
}

impl MenuEntry {
    pub fn kernel_cmdline(&self) -> Option<KernelCmdline> {
        self.raw_cmdline.as_deref().map(KernelCmdline::parse)
    }
}

#[derive(Clone, Debug)]
enum Item {
    Entry(MenuEntry),
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<Item>,
    },
}

/// The answer: which kernel boots next, from what, how sure.
#[derive(Clone, Debug, Serialize)]
pub struct NextKernel {
    pub version: Option<String>,
    pub source: NextSource,
    pub confidence: Confidence,
    pub bootloader: Bootloader,
    /// One sentence: what was read and how it led to the kernel.
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<MenuEntry>,
}

/// Everything read from the boot loader.
#[derive(Clone, Debug)]
pub struct BootMenu {
    pub bootloader: Bootloader,
    /// Every entry, in menu order (submenus flattened).
    pub entries: Vec<MenuEntry>,
    pub next: NextKernel,
}

impl BootMenu {
    /// The first menu entry that boots `version`.
    pub fn entry_for(&self, version: &str) -> Option<&MenuEntry> {
        self.entries
            .iter()
            .find(|e| e.version.as_deref() == Some(version))
    }
}

/// Reads the boot loader configuration under the root.
pub fn discover(root: &RootFs, warnings: &mut Vec<Warning>) -> BootMenu {
    let bls = read_bls(root, warnings);
    if let Some((path, text)) = grub_cfg(root) {
        let env_path = sibling(&path, "grubenv");
        let env = match root.read_text(&env_path) {
            Ok(Some(t)) => parse_grubenv(&t),
            Ok(None) => HashMap::new(),
            Err(e) => {
                warnings.push(Warning::at(&env_path, None, format!("cannot read: {e}")));
                HashMap::new()
            }
        };
        return grub_menu(&path, &text, &env_path, &env, bls, warnings);
    }
    if !bls.is_empty() {
        return bls_menu(root, bls, warnings);
    }
    let next = match moddb::installed_kernels(root).into_iter().next() {
        Some(k) => NextKernel {
            evidence: format!(
                "no GRUB configuration ({}) and no boot loader entries ({}): the newest module tree \
                 installed is assumed to boot next",
                GRUB_CFGS.join(", "),
                BLS_DIRS[0]
            ),
            version: Some(k),
            source: NextSource::NewestInstalled,
            confidence: Confidence::Low,
            bootloader: Bootloader::None,
            entry: None,
        },
        None => NextKernel {
            version: None,
            source: NextSource::None,
            confidence: Confidence::Low,
            bootloader: Bootloader::None,
            evidence: "no boot loader configuration and no module tree under /lib/modules".into(),
            entry: None,
        },
    };
    BootMenu {
        bootloader: Bootloader::None,
        entries: Vec::new(),
        next,
    }
}

fn sibling(path: &str, name: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    }
}

/// The GRUB configuration in effect: /boot/grub2 or /boot/grub, else an ESP's that holds
/// entries itself (not a stub that `configfile`s the one on /boot).
fn grub_cfg(root: &RootFs) -> Option<(String, String)> {
    for path in GRUB_CFGS {
        if let Ok(Some(text)) = root.read_text(path) {
            return Some((path.to_string(), text));
        }
    }
    for dir in ESP_EFI_DIRS {
        for vendor in root.list_dir(dir).unwrap_or_default() {
            let path = format!("{dir}/{}", vendor.to_string_lossy());
            let path = format!("{path}/grub.cfg");
            if let Ok(Some(text)) = root.read_text(&path)
                && (text.contains("menuentry") || text.contains("blscfg"))
            {
                return Some((path, text));
            }
        }
    }
    None
}

/// grubenv: `key=value` lines after a comment header, padded with `#`.
pub fn parse_grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Expands `$name` and `${name}` from `vars`; returns the text and the names that were
/// undefined (expanded to nothing, as GRUB does).
fn expand(text: &str, vars: &HashMap<String, String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut undefined = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut name = String::new();
        if chars.peek() == Some(&'{') {
            chars.next();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                name.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
        }
        if name.is_empty() {
            out.push('$');
            continue;
        }
        match vars.get(&name) {
            Some(v) => out.push_str(v),
            None => {
                if !undefined.contains(&name) {
                    undefined.push(name);
                }
            }
        }
    }
    (out, undefined)
}

/// `/boot/vmlinuz-6.1.0-13-amd64` → `6.1.0-13-amd64`.
pub fn version_from_image(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    ["vmlinuz-", "vmlinux-", "bzImage-", "kernel-", "Image-"]
        .iter()
        .find_map(|p| base.strip_prefix(p))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

struct GrubParse {
    items: Vec<Item>,
    /// `set default=` values outside entries, in order, unexpanded.
    defaults: Vec<(String, usize)>,
    /// `set NAME=VALUE` outside entries (later wins).
    vars: HashMap<String, String>,
    blscfg: bool,
}

/// Words of one line of grub.cfg, split into commands at `;` (shell quoting; `#` comments).
fn commands(line: &str) -> Option<Vec<Vec<String>>> {
    let words = shlex::split(line)?;
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for w in words {
        if w == ";" {
            out.push(Vec::new());
            continue;
        }
        let (w, ends) = match w.strip_suffix(';') {
            Some(head) if !head.is_empty() => (head.to_string(), true),
            _ => (w, false),
        };
        let cur = out.last_mut()?;
        // `then set default=...`: the keyword starts a new command.
        if cur.is_empty() && ["then", "else", "do"].contains(&w.as_str()) {
            continue;
        }
        cur.push(w);
        if ends {
            out.push(Vec::new());
        }
    }
    out.retain(|c| !c.is_empty());
    Some(out)
}

fn parse_grub(path: &str, text: &str, bls: &[MenuEntry], warnings: &mut Vec<Warning>) -> GrubParse {
    enum Open {
        Entry(MenuEntry),
        Submenu(String, Option<String>, Vec<Item>),
        Other,
    }
    let mut p = GrubParse {
        items: Vec::new(),
        defaults: Vec::new(),
        vars: HashMap::new(),
        blscfg: false,
    };
    let mut stack: Vec<Open> = Vec::new();
    fn push_item(stack: &mut [Open], top: &mut Vec<Item>, item: Item) {
        for open in stack.iter_mut().rev() {
            if let Open::Submenu(_, _, items) = open {
                items.push(item);
                return;
            }
        }
        top.push(item);
    }
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(cmds) = commands(line) else {
            warnings.push(Warning::at(
                path,
                Some(line_no),
                "unbalanced quotes; line skipped".into(),
            ));
            continue;
        };
        for mut words in cmds {
            let opens = words.last().is_some_and(|w| w == "{");
            if opens {
                words.pop();
            }
            let Some(cmd) = words.first().cloned() else {
                if opens {
                    stack.push(Open::Other);
                }
                continue;
            };
            let in_entry = stack.iter().any(|o| matches!(o, Open::Entry(_)));
            match cmd.as_str() {
                "}" => match stack.pop() {
                    Some(Open::Entry(e)) => push_item(&mut stack, &mut p.items, Item::Entry(e)),
                    Some(Open::Submenu(title, id, items)) => {
                        push_item(&mut stack, &mut p.items, Item::Submenu { title, id, items })
                    }
                    _ => {}
                },
                "menuentry" | "submenu" if opens => {
                    let title = words.get(1).cloned().unwrap_or_default();
                    let mut id = None;
                    let mut k = 2;
                    while k < words.len() {
                        let w = &words[k];
                        if w == "--id" || w == "$menuentry_id_option" {
                            id = words.get(k + 1).cloned();
                            k += 1;
                        } else if let Some(v) = w.strip_prefix("--id=") {
                            id = Some(v.to_string());
                        }
                        k += 1;
                    }
                    if cmd == "menuentry" {
                        stack.push(Open::Entry(MenuEntry {
                            title: escape_bytes(title.as_bytes()),
                            id: id.map(|i| escape_bytes(i.as_bytes())),
                            version: None,
                            linux: None,
                            cmdline: None,
                            initrd: Vec::new(),
                            origin: format!("{path}:{line_no}"),
                            undefined_vars: Vec::new(),
                            raw_cmdline: None,
                        }));
                    } else {
                        stack.push(Open::Submenu(title, id, Vec::new()));
                    }
                }
                "linux" | "linuxefi" | "linux16" | "kernel" if in_entry => {
                    if let Some(Open::Entry(e)) =
                        stack.iter_mut().rev().find(|o| matches!(o, Open::Entry(_)))
                    {
                        e.linux = words.get(1).cloned();
                        e.version = words.get(1).and_then(|l| version_from_image(l));
                        e.raw_cmdline = Some(words[2.min(words.len())..].join(" "));
                    }
                }
                "initrd" | "initrdefi" | "initrd16" if in_entry => {
                    if let Some(Open::Entry(e)) =
                        stack.iter_mut().rev().find(|o| matches!(o, Open::Entry(_)))
                    {
                        e.initrd = words[1..].to_vec();
                    }
                }
                "set" if !in_entry => {
                    if let Some((name, value)) = words.get(1).and_then(|w| w.split_once('=')) {
                        if name == "default" {
                            p.defaults.push((value.to_string(), line_no));
                        } else {
                            p.vars.insert(name.to_string(), value.to_string());
                        }
                    }
                }
                "blscfg" if !in_entry => {
                    p.blscfg = true;
                    for e in bls {
                        push_item(&mut stack, &mut p.items, Item::Entry(e.clone()));
                    }
                }
                _ if opens => stack.push(Open::Other),
                _ => {}
            }
        }
    }
    p
}

/// Finds the entry a GRUB default names: `N`, a title or an id, `A>B` into submenus. `Ok` with
/// the entry and whether the path ended exactly on it; `Err` when it names nothing.
fn resolve_default<'a>(items: &'a [Item], value: &str) -> Result<(&'a MenuEntry, bool), ()> {
    let mut level = items;
    let parts: Vec<&str> = value.split('>').collect();
    for (i, part) in parts.iter().enumerate() {
        let found = if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse::<usize>().ok().and_then(|n| level.get(n))
        } else {
            level.iter().find(|it| match it {
                Item::Entry(e) => e.title == *part || e.id.as_deref() == Some(*part),
                Item::Submenu { title, id, .. } => title == part || id.as_deref() == Some(*part),
            })
        };
        match found {
            Some(Item::Entry(e)) => return Ok((e, i + 1 == parts.len())),
            Some(Item::Submenu { items, .. }) => {
                if i + 1 == parts.len() {
                    // GRUB opens the submenu; its first entry is highlighted.
                    return first_entry(items).map(|e| (e, false)).ok_or(());
                }
                level = items;
            }
            None => return Err(()),
        }
    }
    Err(())
}

fn first_entry(items: &[Item]) -> Option<&MenuEntry> {
    items.iter().find_map(|it| match it {
        Item::Entry(e) => Some(e),
        Item::Submenu { items, .. } => first_entry(items),
    })
}

fn flatten(items: &[Item], out: &mut Vec<MenuEntry>) {
    for it in items {
        match it {
            Item::Entry(e) => out.push(e.clone()),
            Item::Submenu { items, .. } => flatten(items, out),
        }
    }
}

fn finish_entry(e: &mut MenuEntry, vars: &HashMap<String, String>) {
    if let Some(raw) = e.raw_cmdline.take() {
        let (expanded, undefined) = expand(&raw, vars);
        let expanded = expanded.split_whitespace().collect::<Vec<_>>().join(" ");
        e.cmdline = Some(escape_bytes(expanded.as_bytes()));
        e.raw_cmdline = Some(expanded);
        e.undefined_vars = undefined;
    }
}

fn finish_items(items: &mut [Item], vars: &HashMap<String, String>) {
    for it in items {
        match it {
            Item::Entry(e) => finish_entry(e, vars),
            Item::Submenu { items, .. } => finish_items(items, vars),
        }
    }
}

fn grub_menu(
    path: &str,
    text: &str,
    env_path: &str,
    env: &HashMap<String, String>,
    bls: Vec<MenuEntry>,
    warnings: &mut Vec<Warning>,
) -> BootMenu {
    let mut p = parse_grub(path, text, &bls, warnings);
    // grubenv is loaded first; grub.cfg's `set` only fills in what it lacks (RHEL's
    // `if [ -z "${kernelopts}" ]; then set kernelopts=...`), so grubenv wins.
    let mut vars = p.vars.clone();
    vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    finish_items(&mut p.items, &vars);
    let mut entries = Vec::new();
    flatten(&p.items, &mut entries);

    let env_value = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let refers = |v: &str, name: &str| {
        v.contains(&format!("${{{name}}}")) || v.contains(&format!("${name}"))
    };
    let next_entry_default = p.defaults.iter().find(|(v, _)| refers(v, "next_entry"));
    let other_default = p.defaults.iter().find(|(v, _)| !refers(v, "next_entry"));
    let (value, source, why) = if let (Some(_), Some(next)) =
        (next_entry_default, env_value("next_entry"))
    {
        (
            next.clone(),
            NextSource::GrubNextEntry,
            format!(
                "{env_path} next_entry={} (one-shot, set by grub-reboot)",
                escape_bytes(next.as_bytes())
            ),
        )
    } else {
        match other_default {
            Some((v, line)) if refers(v, "saved_entry") => match env_value("saved_entry") {
                Some(saved) => (
                    saved.clone(),
                    NextSource::GrubSavedEntry,
                    format!(
                        "{path}:{line} set default=\"{}\" and {env_path} saved_entry={}",
                        escape_bytes(v.as_bytes()),
                        escape_bytes(saved.as_bytes())
                    ),
                ),
                None => (
                    "0".to_string(),
                    NextSource::GrubFirstEntry,
                    format!(
                        "{path}:{line} uses saved_entry, which {env_path} does not set: GRUB boots the first entry"
                    ),
                ),
            },
            Some((v, line)) => {
                let (value, _) = expand(v, &vars);
                if value.is_empty() || value == "0" {
                    (
                        "0".to_string(),
                        NextSource::GrubFirstEntry,
                        format!(
                            "{path}:{line} set default=\"{}\": the first entry",
                            escape_bytes(v.as_bytes())
                        ),
                    )
                } else {
                    (
                        value.clone(),
                        NextSource::GrubDefault,
                        format!(
                            "{path}:{line} set default=\"{}\"",
                            escape_bytes(value.as_bytes())
                        ),
                    )
                }
            }
            None => (
                "0".to_string(),
                NextSource::GrubFirstEntry,
                format!("{path} sets no default: GRUB boots the first entry"),
            ),
        }
    };
    let (entry, confidence, evidence) = match resolve_default(&p.items, &value) {
        Ok((e, exact)) => {
            let confidence = match (source, exact) {
                (NextSource::GrubFirstEntry, _) | (_, false) => Confidence::Medium,
                _ => Confidence::High,
            };
            let sub = if exact {
                ""
            } else {
                " (names a submenu: its first entry)"
            };
            (
                Some(e.clone()),
                confidence,
                format!("{why} → menu entry '{}' ({}){sub}", e.title, e.origin),
            )
        }
        Err(()) => {
            let fallback = first_entry(&p.items).cloned();
            let what = fallback
                .as_ref()
                .map_or("no entry at all".to_string(), |e| {
                    format!("the first entry '{}' ({})", e.title, e.origin)
                });
            (
                fallback,
                Confidence::Low,
                format!("{why}, which names no menu entry of {path}: GRUB falls back to {what}"),
            )
        }
    };
    let bl = if p.blscfg {
        " (entries from blscfg)"
    } else {
        ""
    };
    let version = entry.as_ref().and_then(|e| e.version.clone());
    let evidence = match (&entry, &version) {
        (Some(e), None) => format!(
            "{evidence}{bl}; its kernel image {} names no version",
            escape_bytes(e.linux.as_deref().unwrap_or("(none)").as_bytes())
        ),
        _ => format!("{evidence}{bl}"),
    };
    BootMenu {
        bootloader: Bootloader::Grub,
        entries,
        next: NextKernel {
            version,
            source,
            confidence: if entry.as_ref().is_some_and(|e| e.version.is_none()) {
                Confidence::Low
            } else {
                confidence
            },
            bootloader: Bootloader::Grub,
            evidence,
            entry,
        },
    }
}

/// BLS entries of every entries directory, sorted newest version first.
fn read_bls(root: &RootFs, warnings: &mut Vec<Warning>) -> Vec<MenuEntry> {
    let mut out: Vec<MenuEntry> = Vec::new();
    let mut seen_dirs = Vec::new();
    for dir in BLS_DIRS {
        let Ok(resolved) = root.resolve(dir) else {
            continue;
        };
        if seen_dirs.contains(&resolved) {
            continue;
        }
        seen_dirs.push(resolved);
        for name in root.list_dir(dir).unwrap_or_default() {
            let name = name.to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".conf") else {
                continue;
            };
            let path = format!("{dir}/{name}");
            match root.read_text(&path) {
                Ok(Some(text)) => out.push(parse_bls(id, &path, &text)),
                Ok(None) => {}
                Err(e) => warnings.push(Warning::at(
                    &escape_bytes(path.as_bytes()),
                    None,
                    format!("cannot read: {e}"),
                )),
            }
        }
    }
    out.sort_by(|a, b| {
        let va = a.version.as_deref().unwrap_or("");
        let vb = b.version.as_deref().unwrap_or("");
        moddb::version_cmp(vb, va).then_with(|| b.id.cmp(&a.id))
    });
    out
}

/// One BLS entry: `key value` lines; `options` and `initrd` may repeat.
pub fn parse_bls(id: &str, path: &str, text: &str) -> MenuEntry {
    let mut title = None;
    let mut version = None;
    let mut linux = None;
    let mut options: Vec<String> = Vec::new();
    let mut initrd = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim().to_string();
        match key {
            "title" => title = Some(value),
            "version" => version = Some(value),
            "linux" => linux = Some(value),
            "options" => options.push(value),
            // `initrd /initramfs-X.img $tuned_initrd`: variables that expand to nothing go.
            "initrd" => initrd.extend(
                value
                    .split_whitespace()
                    .filter(|w| !w.starts_with('$'))
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    let version = version.or_else(|| linux.as_deref().and_then(version_from_image));
    MenuEntry {
        title: escape_bytes(title.unwrap_or_else(|| id.to_string()).as_bytes()),
        id: Some(escape_bytes(id.as_bytes())),
        version,
        linux,
        cmdline: None,
        initrd,
        origin: escape_bytes(path.as_bytes()),
        undefined_vars: Vec::new(),
        raw_cmdline: (!options.is_empty()).then(|| options.join(" ")),
    }
}

/// A systemd-boot EFI variable: 4 bytes of attributes, then UTF-16LE ending in NUL.
fn efi_string(root: &RootFs, name: &str) -> Option<String> {
    let path = root
        .resolve_real(format!("{EFIVARS}/{name}-{LOADER_GUID}"))
        .ok()?;
    let bytes = std::fs::read(path).ok()?;
    let units: Vec<u16> = bytes
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    let s = String::from_utf16(&units).ok()?;
    (!s.is_empty()).then_some(s)
}

fn bls_matches(pattern: &str, e: &MenuEntry) -> bool {
    let id = e.id.as_deref().unwrap_or("");
    let pattern = pattern.strip_suffix(".conf").unwrap_or(pattern);
    moddb::fnmatch(pattern, id)
}

fn bls_menu(root: &RootFs, mut bls: Vec<MenuEntry>, warnings: &mut Vec<Warning>) -> BootMenu {
    let empty = HashMap::new();
    for e in &mut bls {
        finish_entry(e, &empty);
    }
    let mut choice: Option<(String, NextSource, String)> = None;
    if let Some(v) = efi_string(root, "LoaderEntryOneShot") {
        choice = Some((
            v.clone(),
            NextSource::EfiOneShot,
            format!(
                "EFI variable LoaderEntryOneShot={}",
                escape_bytes(v.as_bytes())
            ),
        ));
    } else if let Some(v) = efi_string(root, "LoaderEntryDefault") {
        choice = Some((
            v.clone(),
            NextSource::EfiDefault,
            format!(
                "EFI variable LoaderEntryDefault={}",
                escape_bytes(v.as_bytes())
            ),
        ));
    } else {
        for path in LOADER_CONFS {
            match root.read_text(path) {
                Ok(Some(text)) => {
                    let default = text.lines().map(str::trim).find_map(|l| {
                        l.strip_prefix("default")
                            .filter(|r| r.starts_with(char::is_whitespace))
                            .map(|r| r.trim().to_string())
                    });
                    if let Some(d) = default {
                        choice = Some((
                            d.clone(),
                            NextSource::LoaderConf,
                            format!("{path} default {}", escape_bytes(d.as_bytes())),
                        ));
                    }
                    break;
                }
                Ok(None) => {}
                Err(e) => warnings.push(Warning::at(path, None, format!("cannot read: {e}"))),
            }
        }
    }
    let (entry, source, confidence, evidence) = match &choice {
        Some((pattern, source, why)) => match bls.iter().find(|e| bls_matches(pattern, e)) {
            Some(e) => (
                Some(e.clone()),
                *source,
                Confidence::High,
                format!("{why} → entry {}", e.origin),
            ),
            None => (
                bls.first().cloned(),
                NextSource::BlsNewest,
                Confidence::Low,
                format!(
                    "{why} matches no entry: the entry that sorts first is assumed{}",
                    bls.first()
                        .map_or(String::new(), |e| format!(" ({})", e.origin))
                ),
            ),
        },
        None => (
            bls.first().cloned(),
            NextSource::BlsNewest,
            Confidence::Medium,
            format!(
                "no default in loader.conf or EFI variables: the entry that sorts first (newest version) boots{}",
                bls.first()
                    .map_or(String::new(), |e| format!(" ({})", e.origin))
            ),
        ),
    };
    BootMenu {
        bootloader: Bootloader::Bls,
        next: NextKernel {
            version: entry.as_ref().and_then(|e| e.version.clone()),
            source,
            confidence: if entry.as_ref().is_some_and(|e| e.version.is_none()) {
                Confidence::Low
            } else {
                confidence
            },
            bootloader: Bootloader::Bls,
            evidence,
            entry,
        },
        entries: bls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::tests::write;

    const DEBIAN_CFG: &str = r#"
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
function load_video {
  insmod all_video
}
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-1234' {
	load_video
	insmod ext2
	echo	'Loading Linux 6.1.0-13-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=1234 ro  quiet
	initrd	/boot/initrd.img-6.1.0-13-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-13-amd64-advanced-1234' {
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=1234 ro  quiet
		initrd	/boot/initrd.img-6.1.0-13-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-9-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-9-amd64-advanced-1234' {
		linux	/boot/vmlinuz-6.1.0-9-amd64 root=UUID=1234 ro  quiet module_blacklist=floppy
		initrd	/boot/initrd.img-6.1.0-9-amd64
	}
}
"#;

    fn menu(files: &[(&str, &str)]) -> BootMenu {
        let dir = tempfile::tempdir().unwrap();
        for (p, t) in files {
            write(dir.path(), p, t);
        }
        let mut w = Vec::new();
        discover(&RootFs::new(dir.path()), &mut w)
    }

    #[test]
    fn grub_first_entry_next_entry_and_submenu_paths() {
        let m = menu(&[("/boot/grub/grub.cfg", DEBIAN_CFG)]);
        assert_eq!(m.bootloader, Bootloader::Grub);
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-13-amd64"));
        assert_eq!(m.next.source, NextSource::GrubFirstEntry);
        assert_eq!(m.next.confidence, Confidence::Medium);
        assert!(
            m.next.evidence.contains("grub.cfg:12"),
            "{}",
            m.next.evidence
        );

        let env = "# GRUB Environment Block\nnext_entry=gnulinux-advanced-1234>gnulinux-6.1.0-9-amd64-advanced-1234\n####\n";
        let m = menu(&[
            ("/boot/grub/grub.cfg", DEBIAN_CFG),
            ("/boot/grub/grubenv", env),
        ]);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-9-amd64"));
        assert_eq!(m.next.source, NextSource::GrubNextEntry);
        assert_eq!(m.next.confidence, Confidence::High);
        let e = m.next.entry.as_ref().unwrap();
        assert_eq!(e.initrd, vec!["/boot/initrd.img-6.1.0-9-amd64"]);
        assert!(
            e.kernel_cmdline()
                .unwrap()
                .list("module_blacklist")
                .contains(&"floppy".to_string())
        );

        // Numeric paths, titles; a default that names nothing falls back to entry 0.
        let cfg = DEBIAN_CFG.replace("set default=\"0\"", "set default=\"1>1\"");
        let m = menu(&[("/boot/grub/grub.cfg", &cfg)]);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-9-amd64"));
        assert_eq!(m.next.source, NextSource::GrubDefault);
        let cfg = DEBIAN_CFG.replace("set default=\"0\"", "set default=\"Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-9-amd64\"");
        assert_eq!(
            menu(&[("/boot/grub/grub.cfg", &cfg)])
                .next
                .version
                .as_deref(),
            Some("6.1.0-9-amd64")
        );
        let cfg = DEBIAN_CFG.replace("set default=\"0\"", "set default=\"gone\"");
        let m = menu(&[("/boot/grub/grub.cfg", &cfg)]);
        assert_eq!(m.next.confidence, Confidence::Low);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-13-amd64"));
        assert!(
            m.next.evidence.contains("names no menu entry"),
            "{}",
            m.next.evidence
        );
    }

    #[test]
    fn grub_saved_entry_with_blscfg_and_kernelopts() {
        let cfg = "set default=\"${saved_entry}\"\nif [ -z \"${kernelopts}\" ]; then\n  set kernelopts=\"root=/dev/x ro \"\nfi\nblscfg\n";
        let env = "# GRUB Environment Block\nsaved_entry=abc-4.18.0-305.el8.x86_64\nkernelopts=root=/dev/mapper/cl-root ro rd.driver.pre=vfio_pci\n";
        let old = "title CentOS (4.18.0-305.el8.x86_64)\nversion 4.18.0-305.el8.x86_64\nlinux /vmlinuz-4.18.0-305.el8.x86_64\ninitrd /initramfs-4.18.0-305.el8.x86_64.img $tuned_initrd\noptions $kernelopts $tuned_params\n";
        let new = "title CentOS (4.18.0-348.el8.x86_64)\nversion 4.18.0-348.el8.x86_64\nlinux /vmlinuz-4.18.0-348.el8.x86_64\ninitrd /initramfs-4.18.0-348.el8.x86_64.img\noptions $kernelopts\n";
        let files = [
            ("/boot/grub2/grub.cfg", cfg),
            ("/boot/grub2/grubenv", env),
            ("/boot/loader/entries/abc-4.18.0-305.el8.x86_64.conf", old),
            ("/boot/loader/entries/abc-4.18.0-348.el8.x86_64.conf", new),
        ];
        let m = menu(&files);
        assert_eq!(m.entries.len(), 2);
        assert_eq!(
            m.entries[0].version.as_deref(),
            Some("4.18.0-348.el8.x86_64"),
            "newest first"
        );
        assert_eq!(m.next.source, NextSource::GrubSavedEntry);
        assert_eq!(m.next.confidence, Confidence::High);
        let e = m.next.entry.as_ref().unwrap();
        assert_eq!(m.next.version.as_deref(), Some("4.18.0-305.el8.x86_64"));
        assert_eq!(
            e.cmdline.as_deref(),
            Some("root=/dev/mapper/cl-root ro rd.driver.pre=vfio_pci")
        );
        assert_eq!(e.undefined_vars, vec!["tuned_params"]);
        // Without saved_entry: the first entry, i.e. the newest BLS entry.
        let m = menu(&[files[0], files[2], files[3]]);
        assert_eq!(m.next.version.as_deref(), Some("4.18.0-348.el8.x86_64"));
        assert_eq!(m.next.source, NextSource::GrubFirstEntry);
        assert_eq!(
            m.next.entry.unwrap().cmdline.as_deref(),
            Some("root=/dev/x ro")
        );
    }

    #[test]
    fn systemd_boot_loader_conf_and_newest() {
        let a = "title Debian\nversion 6.1.0-13-amd64\nlinux /abc/6.1.0-13-amd64/linux\ninitrd /abc/6.1.0-13-amd64/initrd.img-6.1.0-13-amd64\noptions root=/dev/vda1 ro\noptions quiet\n";
        let b = "title Debian\nlinux /vmlinuz-6.12.0-1-amd64\n";
        let m = menu(&[
            ("/boot/efi/loader/entries/abc-6.1.0-13-amd64.conf", a),
            ("/boot/efi/loader/entries/abc-6.12.0-1-amd64.conf", b),
        ]);
        assert_eq!(m.bootloader, Bootloader::Bls);
        assert_eq!(m.next.source, NextSource::BlsNewest);
        assert_eq!(m.next.version.as_deref(), Some("6.12.0-1-amd64"));
        let m = menu(&[
            ("/boot/efi/loader/entries/abc-6.1.0-13-amd64.conf", a),
            ("/boot/efi/loader/entries/abc-6.12.0-1-amd64.conf", b),
            (
                "/boot/efi/loader/loader.conf",
                "timeout 3\ndefault abc-6.1.*\n",
            ),
        ]);
        assert_eq!(m.next.source, NextSource::LoaderConf);
        assert_eq!(m.next.confidence, Confidence::High);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-13-amd64"));
        assert_eq!(
            m.next.entry.unwrap().cmdline.as_deref(),
            Some("root=/dev/vda1 ro quiet")
        );
    }

    #[test]
    fn efi_one_shot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "/boot/loader/entries/a-5.10.0.conf", "version 5.10.0\n");
        write(d, "/boot/loader/entries/a-6.1.0.conf", "version 6.1.0\n");
        write(d, "/boot/loader/loader.conf", "default a-6.1.0.conf\n");
        let mut v = vec![7u8, 0, 0, 0];
        for u in "a-5.10.0.conf".encode_utf16().chain([0]) {
            v.extend_from_slice(&u.to_le_bytes());
        }
        let p = d.join(format!(
            "sys/firmware/efi/efivars/LoaderEntryOneShot-{LOADER_GUID}"
        ));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
        let m = discover(&RootFs::new(d), &mut Vec::new());
        assert_eq!(m.next.source, NextSource::EfiOneShot);
        assert_eq!(m.next.version.as_deref(), Some("5.10.0"));
    }

    #[test]
    fn strings_from_entries_are_escaped_when_shown() {
        let e = parse_bls(
            "x\u{202e}",
            "/boot/loader/entries/x.conf",
            "title T\x1b[31m\nversion 6.1\x1b\nlinux /vmlinuz\x07\ninitrd /i\x1b\n",
        );
        assert_eq!(
            e.version.as_deref(),
            Some("6.1\x1b"),
            "kept as read for look-ups"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["version"], "6.1\\x1b");
        assert_eq!(json["linux"], "/vmlinuz\\x07");
        assert_eq!(json["initrd"][0], "/i\\x1b");
        assert_eq!(json["title"], "T\\x1b[31m");
        assert_eq!(json["id"], "x\\u{202e}");
    }

    #[test]
    fn no_bootloader_means_newest_tree() {
        let m = menu(&[
            ("/lib/modules/6.1.0-9/modules.dep", ""),
            ("/lib/modules/6.1.0-13/modules.dep", ""),
        ]);
        assert_eq!(m.next.source, NextSource::NewestInstalled);
        assert_eq!(m.next.confidence, Confidence::Low);
        assert_eq!(m.next.version.as_deref(), Some("6.1.0-13"));
        assert_eq!(menu(&[]).next.source, NextSource::None);
    }

    #[test]
    fn words_and_variables() {
        assert_eq!(
            commands("if [ x ] ; then set default=\"1\" ; fi").unwrap(),
            vec![
                vec!["if", "[", "x", "]"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
                vec!["set".to_string(), "default=1".to_string()],
                vec!["fi".to_string()],
            ]
        );
        assert_eq!(commands("  # comment").unwrap(), Vec::<Vec<String>>::new());
        assert!(commands("echo 'open").is_none());
        let vars = HashMap::from([("a".to_string(), "1".to_string())]);
        assert_eq!(
            expand("x=$a ${a}$b $", &vars),
            ("x=1 1 $".to_string(), vec!["b".to_string()])
        );
        assert_eq!(
            version_from_image("/vmlinuz-4.18.0-305.el8.x86_64").as_deref(),
            Some("4.18.0-305.el8.x86_64")
        );
        assert_eq!(version_from_image("/boot/vmlinuz"), None);
    }
}
