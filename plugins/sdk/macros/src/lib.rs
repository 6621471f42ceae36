//! `#[jobschleuder("name")]`: registers a function of a plugin with the jobschleuder host.
//!
//! Forms:
//! - `#[jobschleuder("hello_world")]`: a job, `fn(Args) -> Result<Value, JobError>`.
//! - `#[jobschleuder("expand_hosts", preprocessing)]`: `fn(Args) -> Result<Vec<Job>, JobError>`.
//! - `#[jobschleuder("summarize", postprocessing)]`: `fn(Args, Outcome) -> Result<Value, JobError>`.
//! - `#[jobschleuder("hello_world:on_startup")]`: `fn() -> Result<Args, JobError>`; the kind
//!   follows from the name's `:on_startup` suffix, as in the original.

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::{parse_macro_input, Ident, ItemFn, LitStr, Token};

struct Attribute {
    name: LitStr,
    kind: Option<Ident>,
}

impl Parse for Attribute {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let name: LitStr = input.parse()?;
        let kind = if input.peek(Token![,]) {
            input.parse::<Token![,]>()?;
            Some(input.parse::<Ident>()?)
        } else {
            None
        };
        if !input.is_empty() {
            return Err(input.error("expected #[jobschleuder(\"name\")] or #[jobschleuder(\"name\", preprocessing|postprocessing|job)]"));
        }
        Ok(Attribute { name, kind })
    }
}

#[proc_macro_attribute]
pub fn jobschleuder(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attribute = parse_macro_input!(attr as Attribute);
    let function = parse_macro_input!(item as ItemFn);
    let ident = &function.sig.ident;
    let name = attribute.name.value();
    if name.trim().is_empty() {
        return syn::Error::new(attribute.name.span(), "the function name must not be empty")
            .to_compile_error()
            .into();
    }
    let given = attribute.kind.as_ref().map(|k| k.to_string());
    let kind = match (name.ends_with(":on_startup"), given.as_deref()) {
        (true, None | Some("on_startup")) => "on_startup",
        (false, None | Some("job")) => "job",
        (false, Some("preprocessing")) => "preprocessing",
        (false, Some("postprocessing")) => "postprocessing",
        _ => {
            let span = attribute
                .kind
                .as_ref()
                .map(|k| k.span())
                .unwrap_or_else(|| attribute.name.span());
            return syn::Error::new(
                span,
                "unknown kind: use job (the default), preprocessing or postprocessing; \
                 on_startup functions are named \"<job>:on_startup\" and take no kind",
            )
            .to_compile_error()
            .into();
        }
    };
    let (kind_variant, caller) = match kind {
        "job" => (quote!(Job), quote!(call_job)),
        "preprocessing" => (quote!(Preprocessing), quote!(call_preprocessing)),
        "postprocessing" => (quote!(Postprocessing), quote!(call_postprocessing)),
        _ => (quote!(OnStartup), quote!(call_on_startup)),
    };
    let wrapper = format_ident!("__jobschleuder_call_{}", ident);
    quote! {
        #function

        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #wrapper(input: &[u8]) -> ::jobschleuder_plugin::__private::CallResult {
            ::jobschleuder_plugin::__private::#caller(#ident, input)
        }

        ::jobschleuder_plugin::__private::inventory::submit! {
            ::jobschleuder_plugin::__private::Registration {
                name: #name,
                kind: ::jobschleuder_plugin::Kind::#kind_variant,
                call: #wrapper,
            }
        }
    }
    .into()
}
