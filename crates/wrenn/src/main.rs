//! The `wrenn` command (see the library, `lib.rs`): with no extension.

fn main() {
    wrenn::main_with(Vec::new());
}
