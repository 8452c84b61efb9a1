//! Where wrenn keeps its state by default, defined once: every command's default paths derive
//! from [`DATA_DIR`] (`WRENN_DATA_DIR` or `--data-dir` move all of it).

/// The data directory of `wrenn up` and `wrenn server`.
pub const DATA_DIR: &str = "/var/lib/wrenn";
/// A separate host agent's data directory (`wrenn agent serve`).
pub const AGENT_DATA_DIR: &str = "/var/lib/wrenn/agent";
/// Where `wrenn image` keeps the kernels it unpacks.
pub const KERNEL_DIR: &str = "/var/lib/wrenn/kernels";
/// The first API key `wrenn up` writes (the CLI's default key).
pub const INITIAL_KEY_FILE: &str = "/var/lib/wrenn/cp/initial-api-key";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_lies_under_the_data_directory() {
        for path in [AGENT_DATA_DIR, KERNEL_DIR, INITIAL_KEY_FILE] {
            assert!(
                std::path::Path::new(path).starts_with(DATA_DIR),
                "{path} is not under {DATA_DIR}"
            );
        }
    }
}
