//! `wrenn-allowlist`: the whole `wrenn` command, its control plane (`server`, `up`) serving
//! the template allow-list extension. The lists are kept in `$WRENN_ALLOWLIST_FILE` (default:
//! `<data dir>/cp/template-allowlist.json`).

use wrenn_template_allowlist::{AllowList, AllowListExtension, default_file};

fn main() {
    let lists = match AllowList::open(default_file()) {
        Ok(lists) => lists,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    };
    wrenn::main_with(vec![std::sync::Arc::new(AllowListExtension(lists))]);
}
