//! Claims an ABI version no host speaks: the host must refuse it before any other call.

#[no_mangle]
pub extern "C" fn jobschleuder_abi_version() -> u32 {
    999
}

/// Must never be called: the version check comes first.
#[no_mangle]
pub extern "C" fn jobschleuder_plugin_descriptor() -> *const u8 {
    std::process::abort()
}
