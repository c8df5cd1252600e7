//! An object given in `MOAT_EBPF_OBJECT` must declare the map layout the run writes: an older
//! program would read today's entries by its own rules (layout 5 reads a deny as an allow).

mod layouts;

use std::path::Path;

use moat_enforcer_ebpf::LAYOUT_VERSION;
use moat_enforcer_ebpf::dataplane::{Dataplane, DataplaneError, builtin_object, declared_layout};

fn fixture(layout: u32) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/moat-datapath-layout{layout}.o"));
    std::fs::read(p).expect("fixture")
}

#[test]
fn an_object_of_another_layout_is_refused_before_anything_is_written() {
    assert_eq!(declared_layout(builtin_object()), Ok(Some(LAYOUT_VERSION)));
    for n in 1..=5 {
        assert_eq!(
            declared_layout(&fixture(n)),
            Ok(None),
            "layout {n}'s fixture"
        );
    }
    assert!(declared_layout(b"not an object").is_err());

    let (node, root) = layouts::node("object-layout");
    let _sweep = layouts::Sweep(&root);
    let open = |object: &Path| {
        // SAFETY: the binary's only test, on its only thread that reads the environment.
        unsafe { std::env::set_var("MOAT_EBPF_OBJECT", object) };
        let r = Dataplane::open(Path::new(layouts::BPFFS), &node);
        // SAFETY: as above.
        unsafe { std::env::remove_var("MOAT_EBPF_OBJECT") };
        r
    };
    let dir = std::env::temp_dir().join(format!("moat-object-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Layout 5's program, named as this run's datapath: refused, naming the object.
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moat-datapath-layout5.o");
    match open(&old) {
        Err(e @ DataplaneError::ObjectLayout(..)) => {
            let msg = e.to_string();
            assert!(msg.contains("moat-datapath-layout5.o"), "{msg}");
            assert!(msg.contains("no declared layout"), "{msg}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a layout-5 object was loaded as layout {LAYOUT_VERSION}"),
    }
    // An object declaring another layout (this one's, patched): refused too.
    let patched = patch_declared(builtin_object(), LAYOUT_VERSION + 1);
    assert_eq!(declared_layout(&patched), Ok(Some(LAYOUT_VERSION + 1)));
    let path = dir.join("newer.o");
    std::fs::write(&path, &patched).expect("write");
    match open(&path) {
        Err(e @ DataplaneError::ObjectLayout(..)) => {
            assert!(
                e.to_string()
                    .contains(&format!("layout {}", LAYOUT_VERSION + 1)),
                "{e}"
            )
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("an object declaring another layout was loaded"),
    }
    // The built-in object, given by path: loads.
    let path = dir.join("builtin.o");
    std::fs::write(&path, builtin_object()).expect("write");
    open(&path)
        .unwrap_or_else(|e| panic!("this source's object refused (root and BPF needed): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `object` with its declared layout set to `n`.
fn patch_declared(object: &[u8], n: u32) -> Vec<u8> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = object::File::parse(object).expect("ELF");
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok("MOAT_LAYOUT"))
        .expect("declared");
    let section = file
        .section_by_index(sym.section_index().expect("in a section"))
        .unwrap();
    let (off, _) = section.file_range().expect("in the file");
    let at = (off + sym.address()) as usize;
    let mut out = object.to_vec();
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    out
}
