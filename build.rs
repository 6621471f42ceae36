//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds `migrations/` at
//! compile time, and cargo does not know that it reads that folder.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
