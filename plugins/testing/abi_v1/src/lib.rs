//! A plugin as version 1 of the ABI made them, written out by hand (no SDK): its descriptor
//! ends after `set_logger`, and it has no `call_in_run`. The host must still load and call it.
//! Its one job, `v1_echo`, answers its input unchanged (arguments, and whatever else the host
//! sends along).

use std::ffi::c_void;

#[repr(C)]
pub struct Buffer {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

#[repr(C)]
pub struct FunctionEntry {
    name: *const u8,
    name_len: usize,
    kind: u32,
}

type LogFn = unsafe extern "C" fn(*const c_void, u32, *const u8, usize);

#[repr(C)]
pub struct DescriptorV1 {
    abi_version: u32,
    sdk_version: *const u8,
    sdk_version_len: usize,
    functions: *const FunctionEntry,
    function_count: usize,
    call: unsafe extern "C" fn(*const u8, usize, *const u8, usize, *mut Buffer) -> i32,
    free: unsafe extern "C" fn(Buffer),
    set_logger: unsafe extern "C" fn(LogFn, *const c_void, u32),
}

struct Static(DescriptorV1);
// SAFETY: the descriptor points to 'static data only and is never written.
unsafe impl Sync for Static {}

const NAME: &str = "v1_echo";
const VERSION: &str = "1.0.0";

static FUNCTIONS: [FunctionEntryStatic; 1] = [FunctionEntryStatic(FunctionEntry {
    name: NAME.as_ptr(),
    name_len: NAME.len(),
    kind: 1,
})];

struct FunctionEntryStatic(FunctionEntry);
// SAFETY: as above.
unsafe impl Sync for FunctionEntryStatic {}

static DESCRIPTOR: Static = Static(DescriptorV1 {
    abi_version: 1,
    sdk_version: VERSION.as_ptr(),
    sdk_version_len: VERSION.len(),
    functions: &FUNCTIONS[0].0,
    function_count: 1,
    call,
    free,
    set_logger,
});

#[no_mangle]
pub extern "C" fn jobschleuder_abi_version() -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn jobschleuder_plugin_descriptor() -> *const DescriptorV1 {
    &DESCRIPTOR.0
}

/// # Safety
/// The host passes readable input and a writable output buffer.
unsafe extern "C" fn call(
    _name: *const u8,
    _name_len: usize,
    input: *const u8,
    input_len: usize,
    output: *mut Buffer,
) -> i32 {
    let bytes = if input_len == 0 {
        Vec::new()
    } else {
        // SAFETY: guaranteed by the host.
        unsafe { std::slice::from_raw_parts(input, input_len) }.to_vec()
    };
    let mut bytes = std::mem::ManuallyDrop::new(bytes);
    // SAFETY: guaranteed by the host.
    unsafe {
        output.write(Buffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        })
    };
    0
}

/// # Safety
/// `buffer` came from `call`.
unsafe extern "C" fn free(buffer: Buffer) {
    if !buffer.ptr.is_null() {
        // SAFETY: it was a Vec of this library.
        drop(unsafe { Vec::from_raw_parts(buffer.ptr, buffer.len, buffer.cap) });
    }
}

unsafe extern "C" fn set_logger(_log: LogFn, _context: *const c_void, _max_level: u32) {}
