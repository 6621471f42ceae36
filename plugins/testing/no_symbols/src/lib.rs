//! A shared library that is not a jobschleuder plugin.

#[no_mangle]
pub extern "C" fn something_else() -> u32 {
    1
}
