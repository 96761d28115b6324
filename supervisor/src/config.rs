//! Mount configuration files (`<config-dir>/<name>.toml`, specs/config.md):
//! parsing, validation, and errors that name the file, the line and the key.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A mount's configuration, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountConfig {
    /// The mount's name (the file's stem).
    pub name: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// The host directory served.
    pub source: PathBuf,
    /// Line of `source` in the file, for later errors about it.
    pub source_line: usize,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Line of `mountpoint` (of `source` when defaulted).
    pub mountpoint_line: usize,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Other users may use the mount.
    pub allow_other: bool,
    /// Bound processes may act only on their own branch's files.
    pub strict_isolation: bool,
    /// Who besides root may control it.
    pub access: Access,
    /// FUSE tuning.
    pub fuse: Fuse,
    /// Restart limits.
    pub restart: Restart,
}

/// `[access]`: users and groups (names, or numeric ids as strings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// User names or uids.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names or gids.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `passthrough = "auto" | "on" | "off"` (specs/config.md): which opens
/// the kernel serves from the host file itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Passthrough {
    /// Read-only opens of main and of snapshots' pre-images.
    #[default]
    Auto,
    /// As `auto`, and main's writers.
    On,
    /// None.
    Off,
}

impl Passthrough {
    /// The worker's `--passthrough` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Passthrough::Auto => "auto",
            Passthrough::On => "on",
            Passthrough::Off => "off",
        }
    }
}

/// `[fuse]` tuning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fuse {
    /// Session threads.
    pub threads: u32,
    /// Largest write request.
    pub max_write: u32,
    /// Outstanding background requests.
    pub max_background: u32,
    /// How long the kernel may keep names and attributes below the root;
    /// `None`: the worker's default (600 s with the source watch, 1 s
    /// without).
    pub cache_timeout_ms: Option<u32>,
    /// Watch the source for changes made behind the mount's back.
    pub watch_source: bool,
    /// Nodes the kernel may keep before the worker has it drop names.
    pub max_cached_nodes: u32,
    /// Kernel write-back cache.
    pub writeback_cache: bool,
    /// FUSE passthrough.
    pub passthrough: Passthrough,
}

/// `[restart]` limits: at most `burst` restarts within `interval_sec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restart {
    /// Restarts allowed within the interval.
    pub burst: u32,
    /// The interval, in seconds.
    pub interval_sec: u32,
    /// A worker that answers neither its control socket nor a FUSE
    /// request for this long is hung, and is replaced (0: never).
    pub hang_timeout_sec: u32,
}

/// A configuration problem, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong (naming the key) and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

// The file as written: every key optional except `source`, spans kept so
// that checks after parsing can still name the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Spanned<PathBuf>,
    mountpoint: Option<Spanned<PathBuf>>,
    state_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    allow_other: bool,
    #[serde(default)]
    strict_isolation: bool,
    #[serde(default)]
    access: Access,
    #[serde(default)]
    fuse: RawFuse,
    #[serde(default)]
    restart: RawRestart,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFuse {
    threads: Option<Spanned<i64>>,
    max_write: Option<Spanned<i64>>,
    max_background: Option<Spanned<i64>>,
    cache_timeout_ms: Option<Spanned<i64>>,
    watch_source: Option<bool>,
    max_cached_nodes: Option<Spanned<i64>>,
    #[serde(default)]
    writeback_cache: bool,
    #[serde(default)]
    passthrough: Passthrough,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    burst: Option<Spanned<i64>>,
    interval_sec: Option<Spanned<i64>>,
    hang_timeout_sec: Option<Spanned<i64>>,
}

/// Where default state directories go.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// `state_dir` defaults to `<state_root>/<name>`.
    pub state_root: PathBuf,
}

/// Whether `name` may name a mount: usable as a systemd instance name and
/// in a file name.
pub fn valid_mount_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// The config file of mount `name` in `dir`.
pub fn file_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.toml"))
}

/// Names of the mounts configured in `dir` (files `*.toml`), sorted.
pub fn names_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Reads and checks the config of mount `name` from `dir`.
pub fn load(dir: &Path, name: &str, defaults: &Defaults) -> Result<MountConfig, ConfigError> {
    let file = file_of(dir, name);
    let err = |line, message: String| ConfigError {
        file: file.clone(),
        line,
        message,
    };
    if !valid_mount_name(name) {
        return Err(err(
            None,
            format!(
                "{name:?} is not a valid mount name: use 1 to 64 ASCII letters, digits, '-', '_', '.' or '@', not starting with '.'; rename the file"
            ),
        ));
    }
    let text = fs::read_to_string(&file).map_err(|e| err(None, format!("cannot read: {e}")))?;
    parse(&file, name, &text, defaults)
}

/// Checks the text of a config file (`file` and `name` only label it).
pub fn parse(
    file: &Path,
    name: &str,
    text: &str,
    defaults: &Defaults,
) -> Result<MountConfig, ConfigError> {
    let at = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let err = |line, message: String| ConfigError {
        file: file.to_owned(),
        line: Some(line),
        message,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| at(s.start));
        let mut message = e.message().trim().replace("field", "key");
        if let Some(key) = key_on_line(text, line) {
            if !message.contains(&format!("`{key}`")) {
                message = format!("key `{key}`: {message}");
            }
        }
        err(line, message)
    })?;

    let absolute = |key: &str, v: &Spanned<PathBuf>| -> Result<PathBuf, ConfigError> {
        if v.get_ref().is_absolute() {
            Ok(v.get_ref().clone())
        } else {
            Err(err(
                at(v.span().start),
                format!(
                    "key `{key}`: {} is not an absolute path; write it from /",
                    v.get_ref().display()
                ),
            ))
        }
    };
    let int = |key: &str,
               v: &Option<Spanned<i64>>,
               default: u32,
               range: std::ops::RangeInclusive<u32>|
     -> Result<u32, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        u32::try_from(*v.get_ref())
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                err(
                    at(v.span().start),
                    format!(
                        "key `{key}`: {} is out of range; use {} to {}",
                        v.get_ref(),
                        range.start(),
                        range.end()
                    ),
                )
            })
    };

    let source = absolute("source", &raw.source)?;
    let source_line = at(raw.source.span().start);
    let (mountpoint, mountpoint_line) = match &raw.mountpoint {
        Some(m) => (absolute("mountpoint", m)?, at(m.span().start)),
        None => (source.clone(), source_line),
    };
    let state_dir = match &raw.state_dir {
        Some(s) => absolute("state_dir", s)?,
        None => defaults.state_root.join(name),
    };
    let fuse = Fuse {
        threads: int("fuse.threads", &raw.fuse.threads, 4, 1..=64)?,
        max_write: int(
            "fuse.max_write",
            &raw.fuse.max_write,
            1 << 20,
            4096..=16 << 20,
        )?,
        max_background: int(
            "fuse.max_background",
            &raw.fuse.max_background,
            64,
            1..=65535,
        )?,
        cache_timeout_ms: match &raw.fuse.cache_timeout_ms {
            None => None,
            given => Some(int("fuse.cache_timeout_ms", given, 0, 0..=3_600_000)?),
        },
        watch_source: raw.fuse.watch_source.unwrap_or(true),
        max_cached_nodes: int(
            "fuse.max_cached_nodes",
            &raw.fuse.max_cached_nodes,
            agentfs_mount_worker::trim::MAX_NODES as u32,
            agentfs_mount_worker::trim::MAX_NODES_RANGE,
        )?,
        writeback_cache: raw.fuse.writeback_cache,
        passthrough: raw.fuse.passthrough,
    };
    let restart = Restart {
        burst: int("restart.burst", &raw.restart.burst, 5, 0..=1000)?,
        interval_sec: int(
            "restart.interval_sec",
            &raw.restart.interval_sec,
            60,
            1..=86400,
        )?,
        hang_timeout_sec: int(
            "restart.hang_timeout_sec",
            &raw.restart.hang_timeout_sec,
            10,
            0..=3600,
        )?,
    };
    Ok(MountConfig {
        name: name.to_owned(),
        file: file.to_owned(),
        source,
        source_line,
        mountpoint,
        mountpoint_line,
        state_dir,
        allow_other: raw.allow_other,
        strict_isolation: raw.strict_isolation,
        access: raw.access,
        fuse,
        restart,
    })
}

/// The dotted key assigned on `line` (`fuse.threads`), if the line is an
/// assignment: the parser's own messages do not always name it.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') && !l.starts_with("[[") {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
        if i + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim().trim_matches('"');
            if key.is_empty() || key.contains(char::is_whitespace) {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}

impl MountConfig {
    /// Checks what only the running system can tell: the source and the
    /// mountpoint exist and are directories.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        for (key, path, line) in [
            ("source", &self.source, self.source_line),
            ("mountpoint", &self.mountpoint, self.mountpoint_line),
        ] {
            let problem = match fs::metadata(path) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => "is not a directory".to_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    "does not exist; create it or fix the path".to_owned()
                }
                // A dead mount left behind answers ENOTCONN; starting clears it.
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => continue,
                Err(e) => format!("cannot be checked: {e}"),
            };
            return Err(ConfigError {
                file: self.file.clone(),
                line: Some(line),
                message: format!("key `{key}`: {} {problem}", path.display()),
            });
        }
        Ok(())
    }

    /// Settings the worker accepts but does not apply yet.
    pub fn unapplied(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.fuse.writeback_cache {
            v.push("fuse.writeback_cache = true");
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            state_root: PathBuf::from("/var/lib/agentfs"),
        }
    }

    fn parse_str(text: &str) -> Result<MountConfig, ConfigError> {
        parse(
            Path::new("/etc/agentfs/mounts/m.toml"),
            "m",
            text,
            &defaults(),
        )
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse_str("source = \"/srv/p\"\n").unwrap();
        assert_eq!(c.mountpoint, PathBuf::from("/srv/p"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/agentfs/m"));
        assert_eq!(c.fuse.threads, 4);
        assert_eq!(c.fuse.max_write, 1 << 20);
        assert_eq!(c.restart.burst, 5);
        assert_eq!(c.restart.hang_timeout_sec, 10);
        assert!(!c.allow_other);
    }

    #[test]
    fn the_contract_example_parses() {
        let text = r#"
source = "/srv/work/proj"
mountpoint = "/srv/work/proj"
state_dir = "/var/lib/agentfs/proj"
allow_other = true

[access]
users = ["alice"]
groups = ["agents"]

[fuse]
threads = 4
max_write = 1048576
max_background = 64
writeback_cache = true
passthrough = "auto"

[restart]
burst = 5
interval_sec = 60
hang_timeout_sec = 10
"#;
        let c = parse_str(text).unwrap();
        assert_eq!(c.access.users, vec!["alice".to_owned()]);
        assert!(c.fuse.writeback_cache);
        assert_eq!(c.fuse.cache_timeout_ms, None);
        assert!(c.fuse.watch_source);
        assert_eq!(c.source_line, 2);
    }

    #[test]
    fn the_source_watch_and_the_cache_timeout_can_be_set() {
        let c =
            parse_str("source = \"/srv/p\"\n[fuse]\nwatch_source = false\ncache_timeout_ms = 0\n")
                .unwrap();
        assert!(!c.fuse.watch_source);
        assert_eq!(c.fuse.cache_timeout_ms, Some(0));
        let e = parse_str("source = \"/srv/p\"\n[fuse]\nwatch_source = \"yes\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("watch_source"), "{e}");
    }

    #[test]
    fn the_cached_nodes_bound_can_be_set_within_the_journal_s_reach() {
        let c = parse_str("source = \"/srv/p\"\n").unwrap();
        assert_eq!(c.fuse.max_cached_nodes, 150_000);
        let c = parse_str("source = \"/srv/p\"\n[fuse]\nmax_cached_nodes = 300000\n").unwrap();
        assert_eq!(c.fuse.max_cached_nodes, 300_000);
        let e = parse_str("source = \"/srv/p\"\n[fuse]\nmax_cached_nodes = 5000000\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message.contains("max_cached_nodes") && e.message.contains("400000"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let e = parse_str("source = \"/srv/p\"\ncolour = \"red\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/agentfs/mounts/m.toml:2: "), "{s}");
        assert!(s.contains("`colour`"), "{s}");
        let e = parse_str("source = \"/srv/p\"\n[fuse]\nthreds = 2\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("`threds`"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = parse_str("source = \"/srv/p\"\n\n[fuse]\nthreads = \"four\"\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("fuse.threads"), "{e}");
        let e = parse_str("source = \"/srv/p\"\nallow_other = \"yes\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("allow_other"), "{e}");
    }

    #[test]
    fn a_missing_source_is_named() {
        let e = parse_str("allow_other = true\n").unwrap_err();
        assert!(e.message.contains("`source`"), "{e}");
    }

    #[test]
    fn ranges_and_relative_paths_are_refused_with_their_line() {
        let e = parse_str("source = \"/srv/p\"\n[fuse]\nthreads = 0\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("fuse.threads"), "{e}");
        let e = parse_str("source = \"srv/p\"\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("absolute"), "{e}");
    }

    #[test]
    fn missing_directories_are_named_at_start() {
        let c = parse_str("\nsource = \"/nonexistent/agentfs-src\"\n").unwrap();
        let e = c.check_paths().unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("key `source`"), "{e}");
        assert!(e.message.contains("does not exist"), "{e}");
    }

    #[test]
    fn mount_names_fit_systemd_instances() {
        assert!(valid_mount_name("agent1"));
        assert!(valid_mount_name("a.b-c_d@e"));
        assert!(!valid_mount_name(""));
        assert!(!valid_mount_name(".hidden"));
        assert!(!valid_mount_name("a b"));
        assert!(!valid_mount_name("a/b"));
    }

    /// One line of a generated config: known and unknown keys, sections,
    /// values of every type and size, and junk.
    fn config_line() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("source".to_owned()),
            Just("mountpoint".to_owned()),
            Just("state_dir".to_owned()),
            Just("allow_other".to_owned()),
            Just("strict_isolation".to_owned()),
            Just("threads".to_owned()),
            Just("max_write".to_owned()),
            Just("max_background".to_owned()),
            Just("cache_timeout_ms".to_owned()),
            Just("watch_source".to_owned()),
            Just("max_cached_nodes".to_owned()),
            Just("writeback_cache".to_owned()),
            Just("passthrough".to_owned()),
            Just("burst".to_owned()),
            Just("interval_sec".to_owned()),
            Just("hang_timeout_sec".to_owned()),
            Just("users".to_owned()),
            Just("groups".to_owned()),
            "[a-z_]{1,12}",
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            (0i64..70000).prop_map(|v| v.to_string()),
            any::<bool>().prop_map(|v| v.to_string()),
            "/[a-z/]{0,20}".prop_map(|v| format!("{v:?}")),
            any::<String>().prop_map(|v| format!("{v:?}")),
            proptest::collection::vec("[a-z0-9]{0,8}", 0..4).prop_map(|v| format!("{v:?}")),
            Just("\"auto\"".to_owned()),
            Just("{ x = 1 }".to_owned()),
            "\\PC{0,30}",
        ];
        prop_oneof![
            4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => prop_oneof![
                Just("[fuse]".to_owned()),
                Just("[restart]".to_owned()),
                Just("[access]".to_owned()),
                "\\[[a-z]{1,8}\\]",
            ],
            1 => any::<String>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever a config file holds, reading it never panics: it is a
        /// checked config or an error naming a line of the file.
        #[test]
        fn any_config_text_is_read_or_refused_with_its_line(
            lines in proptest::collection::vec(config_line(), 0..16)
        ) {
            let text = lines.join("\n");
            match parse_str(&text) {
                Ok(c) => {
                    proptest::prop_assert!((1..=64).contains(&c.fuse.threads));
                    proptest::prop_assert!(c.restart.burst <= 1000);
                    proptest::prop_assert!(c.restart.hang_timeout_sec <= 3600);
                    proptest::prop_assert!(c.source.is_absolute());
                }
                Err(e) => {
                    let line = e.line.expect("every parse error has a line");
                    proptest::prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{}", e);
                    proptest::prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}
