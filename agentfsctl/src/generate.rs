//! `agentfsctl generate --out DIR`: shell completions and man pages made
//! from the clap definitions, for packaging.
//!
//! Writes `DIR/completions/{agentfsctl.bash,_agentfsctl,agentfsctl.fish}`
//! and `DIR/man/agentfsctl.1` plus one page per subcommand
//! (`agentfsctl-branch-bind.1`, ...).

use std::path::Path;

use clap_complete::Shell;

use crate::bus::Failure;
use crate::cli;

/// Writes the completions and man pages under `out`.
pub fn write(out: &Path) -> Result<(), Failure> {
    let io = |what: &Path, e: std::io::Error| {
        Failure::new(format!("cannot write {}: {e}", what.display()))
    };
    let comp = out.join("completions");
    std::fs::create_dir_all(&comp).map_err(|e| io(&comp, e))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cli::documented();
        clap_complete::generate_to(shell, &mut cmd, "agentfsctl", &comp)
            .map_err(|e| io(&comp, e))?;
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man).map_err(|e| io(&man, e))?;
    clap_mangen::generate_to(cli::documented(), &man).map_err(|e| io(&man, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_completions_and_man_pages() {
        let dir = std::env::temp_dir().join(format!("agentfsctl-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir).unwrap();
        for f in [
            "completions/agentfsctl.bash",
            "completions/_agentfsctl",
            "completions/agentfsctl.fish",
            "man/agentfsctl.1",
            "man/agentfsctl-branch-bind.1",
            "man/agentfsctl-exec.1",
            "man/agentfsctl-mount-start.1",
        ] {
            let p = dir.join(f);
            let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(s.contains("agentfsctl"), "{f}");
        }
        assert!(!dir.join("man/agentfsctl-generate.1").exists());
        let main = std::fs::read_to_string(dir.join("man/agentfsctl.1")).unwrap();
        assert!(main.contains("snapshot\\-create"), "{main}");
        assert!(!main.contains("generate"), "{main}");
        let bash = std::fs::read_to_string(dir.join("completions/agentfsctl.bash")).unwrap();
        assert!(!bash.contains("generate"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
