//! ext-proc's flags, their variables and defaults, as docs/configuration.md lists them.

#[test]
fn the_reference_lists_every_flag_with_its_default() {
    modelgate_doc_check::assert_flags_documented(
        env!("CARGO_BIN_EXE_modelgate-ext-proc").as_ref(),
        include_str!("../../../docs/configuration.md"),
        "ext-proc's flags",
    );
}
