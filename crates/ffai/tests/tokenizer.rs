//! Tokenizer tests against llama.cpp's own output.
//!
//! The expected ids were produced by llama.cpp's `llama-tokenize` (built from the
//! llama-cpp-python 0.3.36 source by `shared/tools/llamacpp-baseline.sh`), run as
//! `llama-tokenize -m MODEL --stdin --no-escape --ids --log-disable`, i.e. with the
//! model's own add_bos default and special-token parsing on — the mode of
//! `Tokenizer::encode(text, tok.add_bos_default())`.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::tokenizer::{StreamDecoder, Tokenizer};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

fn model_path(name: &str) -> PathBuf {
    let dir = match std::env::var("FFAI_MODELS_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/ffai/models"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "test model {} is missing: run scripts/fetch-models.sh (it fetches into $FFAI_MODELS_DIR or ~/.cache/ffai/models)",
        path.display()
    );
    path
}

fn open_model(name: &str) -> GgufFile {
    let path = model_path(name);
    GgufFile::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn load(name: &str) -> Tokenizer {
    Tokenizer::from_gguf(&open_model(name)).unwrap_or_else(|e| panic!("tokenizer of {name}: {e}"))
}

fn smollm2() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(SMOLLM2))
}

fn gemma3() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(GEMMA3))
}

/// SmolLM2-135M-Instruct (byte-level BPE, pre "smollm", no BOS by default).
const SMOLLM2_CASES: &[(&str, &[u32])] = &[
    ("Once upon a time", &[6403, 1980, 253, 655]),
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    (
        "Héllo wörld, ça va? Ñandú",
        &[
            56, 2756, 31394, 267, 29989, 400, 28, 5549, 117, 81, 46316, 47, 5549, 235, 397, 16148,
        ],
    ),
    (
        "日本語のテキストと中文",
        &[
            23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 7365, 118, 28589,
            29184,
        ],
    ),
    (
        "👨\u{200d}👩\u{200d}👧\u{200d}👦 family 🏳\u{fe0f}\u{200d}🌈 flag",
        &[
            10813, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235, 116, 1564,
            15107, 233, 128, 31752, 321, 231, 10813, 230, 226, 7048,
        ],
    ),
    (
        "a  b   c\n\nd\t\te    ",
        &[81, 216, 278, 256, 265, 198, 198, 84, 197, 197, 85, 289],
    ),
    (
        "12345 3.14159 1,000,000",
        &[
            33, 34, 35, 36, 37, 216, 35, 30, 33, 36, 33, 37, 41, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32,
        ],
    ),
    (" leading space", &[2899, 1898]),
    ("", &[]),
    ("x", &[104]),
    (
        "I'm sure you've heard it's ok, they'll say we'd DON'T",
        &[
            57, 5248, 2090, 346, 3543, 3984, 357, 506, 10907, 28, 502, 3060, 1643, 392, 6737, 422, 2154, 23, 68,
        ],
    ),
    (
        "Hello\r\nworld\u{a0}nbsp\u{3000}ideo\u{2003}em",
        &[19556, 201, 198, 6693, 15442, 94, 32093, 12109, 218, 8496, 321, 221, 391],
    ),
    (
        "<table><tr><td>html</td></tr></table> </s> <s>",
        &[
            44, 6413, 21198, 8489, 21198, 11474, 46, 5699, 9617, 11474, 29299, 8489, 29299, 6413, 46, 22577, 99, 46,
            2067, 99, 46,
        ],
    ),
    (
        "fn main() {\n    println!(\"hi\");\n}\n",
        &[
            7853, 1085, 1000, 1662, 472, 1628, 34115, 17, 1470, 6004, 21646, 198, 109, 198,
        ],
    ),
    (
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u{301}e\u{301} ﬁ ŉ",
        &[
            23159, 238, 242, 23159, 238, 121, 23159, 238, 116, 23159, 238, 250, 23159, 238, 122, 23159, 238, 111,
            23159, 238, 112, 35792, 243, 123, 216, 151, 219, 85, 151, 219, 40367, 18811, 227,
        ],
    ),
    (
        "مرحبا بالعالم! Привет, мир!",
        &[
            21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706, 17, 5470, 249, 46879, 16464, 32547,
            28, 41337, 7872, 9175, 17,
        ],
    ),
    ("   ", &[333]),
    ("\n", &[198]),
    ("<|im_start|>user\nhi<|im_end|>", &[1, 4093, 198, 6004, 2]),
    ("text <|endoftext|> more<|im_start|>x", &[2692, 216, 0, 540, 1, 104]),
    (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        &[1, 9690, 198, 2683, 359, 5356, 30, 2, 198, 1, 520, 9531, 198],
    ),
];

/// Gemma 3 270M (SentencePiece with byte fallback, BOS by default, no space prefix).
const GEMMA3_CASES: &[(&str, &[u32])] = &[
    ("Once upon a time", &[2, 14946, 3324, 496, 990]),
    ("The capital of France is", &[2, 818, 5279, 529, 7001, 563]),
    (
        "Héllo wörld, ça va? Ñandú",
        &[
            2, 236814, 7869, 844, 515, 4010, 671, 236764, 20924, 5380, 236881, 211499, 624, 237066,
        ],
    ),
    ("日本語のテキストと中文", &[2, 94951, 236945, 95830, 237032, 55041]),
    (
        "👨\u{200d}👩\u{200d}👧\u{200d}👦 family 🏳\u{fe0f}\u{200d}🌈 flag",
        &[
            2, 243874, 237243, 243767, 237243, 244814, 237243, 244990, 2523, 236743, 248177, 238178, 237243, 243712,
            8134,
        ],
    ),
    (
        "a  b   c\n\nd\t\te    ",
        &[2, 236746, 138, 236763, 139, 236755, 108, 236753, 255969, 236744, 140],
    ),
    (
        "12345 3.14159 1,000,000",
        &[
            2, 236770, 236778, 236800, 236812, 236810, 236743, 236800, 236761, 236770, 236812, 236770, 236810, 236819,
            236743, 236770, 236764, 236771, 236771, 236771, 236764, 236771, 236771, 236771,
        ],
    ),
    (" leading space", &[2, 5830, 2557]),
    ("", &[2]),
    ("x", &[2, 236781]),
    (
        "I'm sure you've heard it's ok, they'll say we'd DON'T",
        &[
            2, 236777, 236789, 236757, 2889, 611, 236789, 560, 6827, 625, 236789, 236751, 7546, 236764, 901, 236789,
            859, 1879, 692, 236789, 236753, 52402, 236789, 236774,
        ],
    ),
    (
        "Hello\r\nworld\u{a0}nbsp\u{3000}ideo\u{2003}em",
        &[
            2, 9259, 251, 107, 12392, 432, 398, 11539, 465, 366, 366, 2159, 464, 366, 369, 581,
        ],
    ),
    (
        "<table><tr><td>html</td></tr></table> </s> <s>",
        &[2, 168, 173, 175, 3185, 183, 181, 176, 236743, 212, 236743, 203],
    ),
    (
        "fn main() {\n    println!(\"hi\");\n}\n",
        &[
            2, 15059, 1689, 825, 642, 107, 140, 4629, 36492, 2202, 1443, 107, 236783, 107,
        ],
    ),
    (
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u{301}e\u{301} ﬁ ŉ",
        &[
            2, 478, 395, 386, 390, 478, 395, 386, 409, 254865, 478, 395, 386, 398, 255458, 478, 395, 386, 399, 478,
            395, 386, 400, 236743, 472, 391, 412, 222461, 236744, 238288, 97940, 236743, 245187,
        ],
    ),
    (
        "مرحبا بالعالم! Привет, мир!",
        &[
            2, 236873, 150345, 107602, 17193, 236888, 15745, 8362, 236764, 58562, 236888,
        ],
    ),
    ("   ", &[2, 139]),
    ("\n", &[2, 107]),
    ("<start_of_turn>user\nhi<end_of_turn>", &[2, 105, 2364, 107, 2202, 106]),
    (
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
        &[2, 105, 2364, 107, 2202, 106, 107, 105, 4368, 107],
    ),
    ("x<eos>y<unused3> z", &[2, 236781, 1, 236762, 9, 904]),
];

/// Random mixes of scripts, whitespace kinds, combining marks and (partial) special-token
/// texts, checked against llama-tokenize the same way.
const SMOLLM2_FUZZ: &[(&str, &[u32])] = &[
    (
        "ø\u{200d}\u{200d}'LL8🏳語\u{fe0f}Q8<bos>어한\u{fe0f}1ß0É<unk>",
        &[
            21817, 321, 231, 321, 231, 23, 16421, 40, 10813, 233, 128, 179, 120, 248, 31752, 65, 40, 44, 34761, 46,
            183, 240, 129, 33085, 246, 31752, 33, 34878, 32, 39614, 44, 5131, 46,
        ],
    ),
    (
        "Ñ🌈D語n't\u{301}=\r😀\u{301}\u{b}\u{200d}\u{2003}Ж🌈",
        &[
            142, 235, 10813, 230, 226, 52, 179, 120, 248, 94, 982, 151, 219, 45, 201, 10813, 242, 218, 151, 219, 199,
            321, 231, 321, 221, 155, 240, 10813, 230, 226,
        ],
    ),
    (
        "ス1\u{fe0f}\u{fe0f}è\t어ß\u{c}nЯ\u{c}WЖ4Я\u{3000}@-^",
        &[
            10391, 134, 33, 31752, 31752, 11180, 197, 183, 240, 129, 34878, 200, 94, 155, 124, 200, 71, 155, 240, 36,
            155, 124, 12109, 218, 48, 29, 78,
        ],
    ),
    (
        "-я어bßà<|im_\u{200d}本'}@}ĠE국1\u{fe0f}\u{308}🌈6\u{fe0f}2\n",
        &[
            29, 16885, 183, 240, 129, 82, 34878, 16739, 44, 108, 306, 79, 321, 231, 40993, 16124, 48, 109, 143, 250,
            53, 181, 130, 251, 33, 31752, 151, 226, 10813, 230, 226, 38, 31752, 34, 198,
        ],
    ),
    (
        "\u{85}    語م Z8\u{2003}.q=δ<bos>ø🏳",
        &[
            141, 223, 333, 25792, 120, 248, 21706, 1777, 40, 321, 221, 30, 97, 45, 29589, 44, 34761, 46, 21817, 10813,
            233, 128,
        ],
    ),
    (
        "γγمC\u{85}X\n\u{b}<mask>8uمя8",
        &[
            23098, 23098, 21706, 51, 141, 223, 72, 198, 199, 44, 8836, 46, 40, 101, 21706, 16885, 40,
        ],
    ),
    (
        "8\u{301}7한رδßم\u{308}Жδ\u{308}👩🎉本`3è\u{2028}語ç\u{308}6\u{308}+",
        &[
            40, 151, 219, 39, 33085, 246, 20602, 29589, 34878, 21706, 151, 226, 155, 240, 29589, 151, 226, 10813, 235,
            119, 10813, 232, 227, 40993, 80, 35, 11180, 321, 118, 179, 120, 248, 11512, 151, 226, 38, 151, 226, 27,
        ],
    ),
    (
        "😀キ[本日ト\u{fe0f}yト<eos>β31üX\u{a0}\u{2003}ñ\u{c}ر\u{200d}4Z",
        &[
            10813, 242, 218, 10391, 251, 75, 40993, 23274, 115, 11100, 226, 31752, 105, 11100, 226, 44, 85, 395, 46,
            22235, 35, 33, 7170, 72, 15442, 321, 221, 10214, 200, 20602, 321, 231, 36, 74,
        ],
    ),
    (
        "\u{2003}4O49%è\u{301}ト\u{200d}<|im_start|>H(\u{a0}l>ø=\u{308}öqaU",
        &[
            321, 221, 36, 63, 36, 41, 21, 11180, 151, 219, 11100, 226, 321, 231, 1, 56, 24, 15442, 92, 46, 21817, 45,
            151, 226, 7466, 14619, 69,
        ],
    ),
    (
        "δя{6\u{fe0f}Ж/中\u{2003}日 4🏳f\u{200d}<start_of_turn>é",
        &[
            29589, 16885, 107, 38, 31752, 155, 240, 31, 28589, 321, 221, 23274, 115, 216, 36, 10813, 233, 128, 86, 321,
            231, 44, 3738, 79, 1714, 79, 20589, 46, 2756,
        ],
    ),
    (
        "\nßqテЯ#à語v👩\u{200d}ح:اf",
        &[
            198, 34878, 97, 11100, 224, 155, 124, 19, 16739, 179, 120, 248, 102, 10813, 235, 119, 321, 231, 44626, 42,
            10805, 86,
        ],
    ),
    (
        "2👨👨ü&\n\n\n\u{2028}<start_of어",
        &[
            34, 10813, 235, 118, 10813, 235, 118, 7170, 22, 16506, 321, 118, 44, 3738, 79, 1714, 183, 240, 129,
        ],
    ),
    (
        "\u{a0}<0x41> ح🏳ارR<pad>&c\u{2028}本🎉αO",
        &[
            15442, 44, 32, 104, 36, 33, 46, 14787, 251, 10813, 233, 128, 10805, 20602, 66, 44, 16384, 46, 22, 83, 321,
            118, 40993, 10813, 232, 227, 8998, 63,
        ],
    ),
    (
        "~é\u{301}م87èà/\u{fe0f}👩\u{200d}N%<|im_start|>文å<|im_start|>",
        &[
            110, 2756, 151, 219, 21706, 40, 39, 11180, 16739, 31, 31752, 10813, 235, 119, 321, 231, 62, 21, 1, 29184,
            27054, 1,
        ],
    ),
];
const GEMMA3_FUZZ: &[(&str, &[u32])] = &[
    (
        "ø\u{200d}\u{200d}'LL8🏳語\u{fe0f}Q8<bos>어한\u{fe0f}1ß0É<unk>",
        &[
            2, 237465, 237243, 237243, 236789, 2182, 236828, 248177, 238582, 238178, 236935, 236828, 2, 237430, 237384,
            238178, 236770, 237435, 236771, 237642, 3,
        ],
    ),
    (
        "Ñ🌈D語n't\u{301}=\r😀\u{301}\u{b}\u{200d}\u{2003}Ж🌈",
        &[
            2, 240643, 243712, 236796, 238582, 236749, 236789, 236745, 238288, 236784, 251, 242398, 238288, 249,
            237243, 464, 366, 369, 238444, 243712,
        ],
    ),
    (
        "ス1\u{fe0f}\u{fe0f}è\t어ß\u{c}nЯ\u{c}WЖ4Я\u{3000}@-^",
        &[
            2, 237084, 236770, 238178, 238178, 237022, 255968, 237430, 237435, 250, 236749, 237998, 250, 236824,
            238444, 236812, 237998, 465, 366, 366, 227760, 236884,
        ],
    ),
    (
        "-я어bßà<|im_\u{200d}本'}@}ĠE국1\u{fe0f}\u{308}🌈6\u{fe0f}2\n",
        &[
            2, 236772, 236895, 237430, 236763, 237435, 236937, 236820, 236909, 548, 236779, 237243, 237261, 26105,
            236940, 236783, 245237, 236788, 238231, 236770, 238178, 241151, 243712, 236825, 238178, 236778, 107,
        ],
    ),
    (
        "\u{85}    語م Z8\u{2003}.q=δ<bos>ø🏳",
        &[
            2, 432, 371, 140, 238582, 236873, 1491, 236828, 464, 366, 369, 236761, 236809, 236784, 237476, 2, 237465,
            248177,
        ],
    ),
    (
        "γγمC\u{85}X\n\u{b}<mask>8uمя8",
        &[
            2, 47000, 236873, 236780, 432, 371, 236917, 107, 249, 4, 236828, 236756, 236873, 236895, 236828,
        ],
    ),
    (
        "8\u{301}7한رδßم\u{308}Жδ\u{308}👩🎉本`3è\u{2028}語ç\u{308}6\u{308}+",
        &[
            2, 236828, 238288, 236832, 237384, 236871, 237476, 237435, 236873, 241151, 238444, 237476, 241151, 243767,
            242061, 237261, 236929, 236800, 237022, 464, 366, 406, 238582, 236999, 241151, 236825, 241151, 236862,
        ],
    ),
    (
        "😀キ[本日ト\u{fe0f}yト<eos>β31üX\u{a0}\u{2003}ñ\u{c}ر\u{200d}4Z",
        &[
            2, 242398, 237620, 236840, 147793, 237099, 238178, 236762, 237099, 1, 237912, 236800, 236770, 236959,
            236917, 432, 398, 464, 366, 369, 237168, 250, 236871, 237243, 236812, 236953,
        ],
    ),
    (
        "\u{2003}4O49%è\u{301}ト\u{200d}<|im_start|>H(\u{a0}l>ø=\u{308}öqaU",
        &[
            2, 464, 366, 369, 236812, 236806, 236812, 236819, 236908, 237022, 238288, 237099, 237243, 236820, 236909,
            548, 236779, 3041, 111038, 236814, 236769, 432, 398, 236752, 236813, 237465, 236784, 241151, 237001, 19699,
            236836,
        ],
    ),
    (
        "δя{6\u{fe0f}Ж/中\u{2003}日 4🏳f\u{200d}<start_of_turn>é",
        &[
            2, 237476, 236895, 236782, 236825, 238178, 238444, 236786, 237103, 464, 366, 369, 237205, 236743, 236812,
            248177, 236760, 237243, 105, 236859,
        ],
    ),
    (
        "\nßqテЯ#à語v👩\u{200d}ح:اf",
        &[
            2, 107, 237435, 236809, 237487, 237998, 236865, 236937, 238582, 236766, 243767, 237243, 236989, 236787,
            236821, 236760,
        ],
    ),
    (
        "2👨👨ü&\n\n\n\u{2028}<start_of어",
        &[
            2, 236778, 243874, 243874, 236959, 236880, 109, 464, 366, 406, 236820, 3041, 236779, 1340, 237430,
        ],
    ),
    (
        "\u{a0}<0x41> ح🏳ارR<pad>&c\u{2028}本🎉αO",
        &[
            2, 432, 398, 236820, 236771, 236781, 236812, 236770, 236813, 3098, 248177, 1666, 236794, 0, 236880, 236755,
            464, 366, 406, 237261, 242061, 237003, 236806,
        ],
    ),
    (
        "~é\u{301}م87èà/\u{fe0f}👩\u{200d}N%<|im_start|>文å<|im_start|>",
        &[
            2, 236995, 236859, 238288, 236873, 236828, 236832, 237022, 236937, 236786, 238178, 243767, 237243, 236797,
            236908, 236820, 236909, 548, 236779, 3041, 111038, 237364, 237139, 236820, 236909, 548, 236779, 3041,
            111038,
        ],
    ),
];

/// Strings whose decoding must never show U+FFFD at any step of streaming.
const MULTIBYTE: &[&str] = &[
    "日本語のテキストと中文",
    "👨\u{200d}👩\u{200d}👧\u{200d}👦 family 🏳\u{fe0f}\u{200d}🌈 flag",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u{301}e\u{301} ﬁ ŉ",
    "Héllo wörld, ça va? Ñandú",
];

fn check_ids(tok: &Tokenizer, cases: &[(&str, &[u32])]) {
    let mut failures = Vec::new();
    for &(text, want) in cases {
        let got = tok.encode(text, tok.add_bos_default()).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n  llama.cpp {want:?}\n  ffai      {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "ids differ from llama.cpp:\n{}",
        failures.join("\n")
    );
}

fn without_bos<'a>(tok: &Tokenizer, ids: &'a [u32]) -> &'a [u32] {
    match (ids.first(), tok.bos_id()) {
        (Some(&first), Some(bos)) if first == bos => &ids[1..],
        _ => ids,
    }
}

/// decode(encode(s)) == s, and with BOS asked for, BOS is in front exactly once.
fn check_round_trip(tok: &Tokenizer, cases: &[(&str, &[u32])]) {
    for &(text, _) in cases {
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&plain), text, "decode(encode({text:?}, false))");
        let with_bos = tok.encode(text, true).unwrap();
        let bos = tok.bos_id().unwrap();
        if plain.first() == Some(&bos) {
            assert_eq!(with_bos, plain, "BOS doubled for {text:?}");
        } else {
            assert_eq!(with_bos[0], bos);
            assert_eq!(with_bos[1..], plain[..], "{text:?}");
            assert_eq!(
                tok.decode(&with_bos[1..]),
                text,
                "decode(encode({text:?}, true) without BOS)"
            );
            let bos_text = tok.token_text(bos).unwrap();
            assert_eq!(tok.decode(&with_bos), format!("{bos_text}{text}"));
        }
    }
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> (String, Vec<String>) {
    let mut dec = StreamDecoder::new(tok);
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    chunks.push(dec.finish());
    (chunks.concat(), chunks)
}

fn check_stream(tok: &Tokenizer, cases: &[(&str, &[u32])]) {
    for &(text, _) in cases {
        let ids = tok.encode(text, false).unwrap();
        let (full, chunks) = stream(tok, &ids);
        assert_eq!(full, text, "streamed decode of {text:?}");
        assert_eq!(
            chunks.last().map(String::as_str),
            Some(""),
            "finish() had leftovers for {text:?}"
        );
    }
    for text in MULTIBYTE {
        let ids = tok.encode(text, false).unwrap();
        let (full, chunks) = stream(tok, &ids);
        assert_eq!(full, *text);
        assert!(
            chunks.iter().all(|c| !c.contains('\u{FFFD}')),
            "U+FFFD while streaming {text:?}: {chunks:?}"
        );
    }
}

#[test]
fn smollm2_ids_match_llama_cpp() {
    let tok = smollm2();
    assert!(!tok.add_bos_default());
    check_ids(tok, SMOLLM2_CASES);
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    let tok = gemma3();
    assert!(tok.add_bos_default());
    check_ids(tok, GEMMA3_CASES);
}

#[test]
fn mixed_strings_match_llama_cpp() {
    check_ids(smollm2(), SMOLLM2_FUZZ);
    check_ids(gemma3(), GEMMA3_FUZZ);
    check_round_trip(smollm2(), SMOLLM2_FUZZ);
    check_round_trip(gemma3(), GEMMA3_FUZZ);
    check_stream(smollm2(), SMOLLM2_FUZZ);
    check_stream(gemma3(), GEMMA3_FUZZ);
}

#[test]
fn smollm2_decode_round_trips() {
    check_round_trip(smollm2(), SMOLLM2_CASES);
}

#[test]
fn gemma3_decode_round_trips() {
    check_round_trip(gemma3(), GEMMA3_CASES);
}

#[test]
fn smollm2_stream_decoder_reproduces_text() {
    let tok = smollm2();
    check_stream(tok, SMOLLM2_CASES);
    // Byte-level BPE splits "👨" over three tokens: nothing may come out before the last.
    let ids = tok.encode("👨", false).unwrap();
    assert!(ids.len() > 1, "expected a split emoji, got {ids:?}");
    let (_, chunks) = stream(tok, &ids);
    assert!(chunks[..ids.len() - 1].iter().all(String::is_empty), "{chunks:?}");
    assert_eq!(chunks[ids.len() - 1], "👨");
}

#[test]
fn gemma3_stream_decoder_reproduces_text() {
    let tok = gemma3();
    check_stream(tok, GEMMA3_CASES);
    // "𝔘" is four byte-fallback tokens.
    let ids = tok.encode("𝔘", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let (_, chunks) = stream(tok, &ids);
    assert_eq!(chunks, ["", "", "", "𝔘", ""]);
}

#[test]
fn stream_decoder_flushes_broken_bytes_lossily() {
    let tok = gemma3();
    let lead = tok.encode("𝔘", false).unwrap()[0];
    assert_eq!(tok.token_bytes(lead), [0xF0]);
    let x = tok.encode("x", false).unwrap();
    let mut dec = StreamDecoder::new(tok);
    assert_eq!(dec.push(lead), "");
    // A lead byte followed by ASCII can never complete: replaced, and the ASCII kept.
    assert_eq!(dec.push(x[0]), "\u{FFFD}x");
    assert_eq!(dec.push(lead), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
}

#[test]
fn eog_ids_match_llama_cpp() {
    assert_eq!(smollm2().eog_ids(), [0, 2, 4]);
    assert_eq!(gemma3().eog_ids(), [1, 106, 212]);
}

#[test]
fn special_roles() {
    let s = smollm2();
    assert_eq!((s.bos_id(), s.eos_id()), (Some(1), Some(2)));
    assert_eq!(s.vocab_size(), 49152);
    assert_eq!(s.token_text(1), Some("<|im_start|>"));
    assert_eq!(s.token_text(2), Some("<|im_end|>"));
    assert!(s.is_special(0) && s.is_special(1) && s.is_special(2) && s.is_special(4));
    assert!(!s.is_special(104));
    assert!(s.chat_template().is_some_and(|t| t.contains("<|im_start|>")));
    let roles = s.special_tokens();
    for want in [
        ("bos", 1, "<|im_start|>"),
        ("eos", 2, "<|im_end|>"),
        ("unk", 0, "<|endoftext|>"),
        ("pad", 2, "<|im_end|>"),
    ] {
        assert!(
            roles.iter().any(|(r, id, t)| (r.as_str(), *id, t.as_str()) == want),
            "{want:?} not in {roles:?}"
        );
    }

    let g = gemma3();
    assert_eq!((g.bos_id(), g.eos_id()), (Some(2), Some(1)));
    assert_eq!(g.vocab_size(), 262144);
    assert_eq!(g.token_text(106), Some("<end_of_turn>"));
    assert!(g.is_special(1) && g.is_special(2) && g.is_special(105) && g.is_special(106) && g.is_special(212));
    // User-defined pieces such as "\n" and "<table>" are text.
    assert!(!g.is_special(107) && !g.is_special(168));
    assert!(!g.is_special(u32::MAX));
    let roles = g.special_tokens();
    for want in [
        ("bos", 2, "<bos>"),
        ("eos", 1, "<eos>"),
        ("eot", 106, "<end_of_turn>"),
        ("unk", 3, "<unk>"),
        ("pad", 0, "<pad>"),
    ] {
        assert!(
            roles.iter().any(|(r, id, t)| (r.as_str(), *id, t.as_str()) == want),
            "{want:?} not in {roles:?}"
        );
    }
    assert!(roles.iter().any(|(_, id, _)| *id == 212));
}

#[test]
fn token_bytes_and_text() {
    let s = smollm2();
    assert_eq!(s.token_text(216), Some("Ġ"));
    assert_eq!(s.token_bytes(216), b" ");
    assert_eq!(s.token_bytes(198), b"\n");
    assert_eq!(s.token_bytes(1), b"<|im_start|>");
    // The first of the three tokens of "👨" is its first two UTF-8 bytes.
    let ids = s.encode("👨", false).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| s.token_bytes(id)).collect();
    assert_eq!(bytes, "👨".as_bytes());

    let g = gemma3();
    assert_eq!(g.token_text(5830), Some("▁leading"));
    assert_eq!(g.token_bytes(5830), b" leading");
    assert_eq!(g.token_bytes(138), b"  ");
    assert_eq!(g.token_bytes(106), b"<end_of_turn>");
    for (i, b) in "𝔘".bytes().zip(g.encode("𝔘", false).unwrap()).map(|(b, id)| (id, b)) {
        assert_eq!(g.token_text(i), Some(format!("<0x{b:02X}>").as_str()));
        assert_eq!(g.token_bytes(i), [b]);
    }
    assert_eq!(g.token_text(u32::MAX), None);
    assert!(g.token_bytes(u32::MAX).is_empty());
}

#[test]
fn bos_is_added_once_and_only_when_asked() {
    let g = gemma3();
    assert_eq!(g.encode("x", false).unwrap(), [236781]);
    assert_eq!(g.encode("x", true).unwrap(), [2, 236781]);
    // A prompt that already starts with <bos> (a rendered chat template) keeps one.
    assert_eq!(g.encode("<bos>x", true).unwrap(), [2, 236781]);
    assert_eq!(g.encode("<bos>x", false).unwrap(), [2, 236781]);
    let s = smollm2();
    assert_eq!(s.encode("x", true).unwrap(), [1, 104]);
    assert_eq!(s.encode("<|im_start|>x", true).unwrap(), [1, 104]);
}

#[test]
fn decode_skips_unknown_ids_and_renders_specials() {
    let g = gemma3();
    assert_eq!(g.decode(&[u32::MAX, 236781, 262144]), "x");
    assert_eq!(
        g.decode(&[2, 105, 2364, 107, 2202, 106]),
        "<bos><start_of_turn>user\nhi<end_of_turn>"
    );
    let s = smollm2();
    assert_eq!(
        s.decode(&[1, 4093, 198, 6004, 2, 49152]),
        "<|im_start|>user\nhi<|im_end|>"
    );
    assert_eq!(s.decode(&[]), "");
}

/// Deterministic varied text (no two words alike), so no encoder cache can help.
fn long_text(words: usize) -> String {
    let alphabets: [&[char]; 3] = [
        &['a', 'e', 'i', 'o', 'u', 'r', 's', 't', 'n', 'l', 'k', 'p', 'm'],
        &['日', '本', '語', 'の', 'テ', 'キ', 'ス', 'ト', '中', '文'],
        &['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '.', ','],
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = String::new();
    for i in 0..words {
        let r = next();
        let alphabet = alphabets[if r % 10 < 7 { 0 } else { (r % 2 + 1) as usize }];
        for _ in 0..(2 + next() % 8) {
            out.push(alphabet[(next() % alphabet.len() as u64) as usize]);
        }
        out.push(if i % 17 == 16 { '\n' } else { ' ' });
    }
    out
}

/// Encoding must stay linear in the text: finding special tokens, the SentencePiece
/// merge queue and the BPE words all do a bounded amount of work per byte. Instead of a
/// stopwatch (which depends on the machine and its load), the encoder counts its steps:
/// four times the text must cost at most about four times the steps, where a quadratic
/// encoder would take sixteen.
#[test]
fn long_prompts_encode_in_linear_work() {
    // long_text(n) is a prefix of long_text(m) for n < m.
    let short = long_text(2000);
    let long = long_text(8000);
    assert!(long.starts_with(&short));
    for tok in [smollm2(), gemma3()] {
        let (short_ids, short_work) = tok.encode_with_work(&short, true).unwrap();
        let (ids, work) = tok.encode_with_work(&long, true).unwrap();
        assert!(ids.len() >= 16000, "only {} tokens", ids.len());
        assert_eq!(ids, tok.encode(&long, true).unwrap());
        assert_eq!(tok.decode(without_bos(tok, &ids)), long);
        let ratio = work as f64 / short_work as f64;
        let len_ratio = long.len() as f64 / short.len() as f64;
        assert!(
            ratio < 1.15 * len_ratio,
            "{} steps for {} bytes, {} for {} bytes: {ratio:.2}x the work for {len_ratio:.2}x the text",
            short_work,
            short.len(),
            work,
            long.len()
        );
        // And a small constant per byte (2 to 5 for these texts).
        assert!(work < 16 * long.len() as u64, "{work} steps for {} bytes", long.len());
        assert!(short_ids.len() * 3 < ids.len());
    }
}

// --- A tiny SentencePiece vocabulary written as GGUF, with the space prefix on ---

fn s(x: &str) -> MetaValue {
    MetaValue::String(x.to_owned())
}

/// <unk>, <s>, </s>, the 256 byte tokens, a few pieces, a control and a user-defined
/// token. Scores fall with the id, so earlier pieces merge first.
fn tiny_spm_metadata() -> Vec<(String, MetaValue)> {
    let mut toks: Vec<(String, i32)> = vec![("<unk>".into(), 2), ("<s>".into(), 3), ("</s>".into(), 3)];
    for b in 0..=255u32 {
        toks.push((format!("<0x{b:02X}>"), 6));
    }
    for t in [
        "▁", "h", "i", "e", "l", "o", "▁h", "▁hi", "he", "ll", "hel", "hell", "hello", "▁hello", "lo", "▁w", "w", "r",
        "d", "or", "▁wor", "ld", "▁world",
    ] {
        toks.push((t.into(), 1));
    }
    toks.push(("<|turn|>".into(), 3));
    toks.push(("<tag>".into(), 4));
    let scores = toks
        .iter()
        .enumerate()
        .map(|(i, t)| MetaValue::F32(if t.1 == 1 { -(i as f32) } else { 0.0 }));
    vec![
        ("general.architecture".into(), s("llama")),
        ("tokenizer.ggml.model".into(), s("llama")),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(toks.iter().map(|t| s(&t.0)).collect()),
        ),
        ("tokenizer.ggml.scores".into(), MetaValue::Array(scores.collect())),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(toks.iter().map(|t| MetaValue::I32(t.1)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0)),
    ]
}

fn gguf_from(metadata: Vec<(String, MetaValue)>) -> GgufFile {
    let bytes = GgufWriter {
        metadata,
        ..Default::default()
    }
    .to_bytes();
    GgufFile::from_bytes(&bytes).unwrap()
}

fn with_key(mut md: Vec<(String, MetaValue)>, key: &str, value: Option<MetaValue>) -> Vec<(String, MetaValue)> {
    md.retain(|(k, _)| k != key);
    if let Some(v) = value {
        md.push((key.to_owned(), v));
    }
    md
}

#[test]
fn tiny_spm_matches_llama_cpp() {
    let tok = Tokenizer::from_gguf(&gguf_from(tiny_spm_metadata())).unwrap();
    assert!(tok.add_bos_default());
    assert_eq!(tok.eog_ids(), [2]);
    // llama-tokenize on the same GGUF (written to a file, plus the llama.* keys it needs).
    let cases: &[(&str, &[u32])] = &[
        ("hello world", &[1, 265, 262, 268, 264, 281]),
        ("hi", &[1, 266]),
        (" hi", &[1, 259, 266]),
        ("hi  hello", &[1, 266, 259, 265, 262, 268, 264]),
        (
            "<|turn|>hello<|turn|> world",
            &[1, 282, 265, 262, 268, 264, 282, 259, 281],
        ),
        ("<tag>hi", &[1, 283, 266]),
        ("hé", &[1, 265, 198, 172]),
        ("", &[1]),
        ("\n", &[1, 259, 13]),
    ];
    check_ids(&tok, cases);
    // The space the encoder put in front of the text (and after each special token)
    // is taken off again, and only that one.
    check_round_trip(&tok, cases);
    check_stream(&tok, cases);
    assert_eq!(tok.decode(&[266, 266]), "hi hi");
    assert_eq!(tok.decode(&[1, 259, 266]), "<s> hi");
}

#[test]
fn tiny_spm_without_space_prefix() {
    let md = with_key(
        tiny_spm_metadata(),
        "tokenizer.ggml.add_space_prefix",
        Some(MetaValue::Bool(false)),
    );
    let tok = Tokenizer::from_gguf(&gguf_from(md)).unwrap();
    assert_eq!(tok.encode("hi", false).unwrap(), [260, 261]);
    assert_eq!(tok.encode(" hi", false).unwrap(), [266]);
    assert_eq!(tok.decode(&[266]), " hi");
}

#[test]
fn bad_gguf_metadata_is_an_error() {
    let err = |md: Vec<(String, MetaValue)>| match Tokenizer::from_gguf(&gguf_from(md)) {
        Ok(_) => panic!("accepted bad metadata"),
        Err(e) => e.to_string(),
    };
    let md = tiny_spm_metadata;
    let n = 284u32;

    let e = err(with_key(md(), "tokenizer.ggml.tokens", None));
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = err(with_key(md(), "tokenizer.ggml.model", None));
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
    let e = err(with_key(md(), "tokenizer.ggml.bos_token_id", Some(MetaValue::U32(n))));
    assert!(e.contains("bos_token_id") && e.contains("284"), "{e}");
    let e = err(with_key(
        md(),
        "tokenizer.ggml.eos_token_id",
        Some(MetaValue::U32(u32::MAX)),
    ));
    assert!(e.contains("eos_token_id"), "{e}");
    let e = err(with_key(
        md(),
        "tokenizer.ggml.scores",
        Some(MetaValue::Array(vec![MetaValue::F32(0.0); 10])),
    ));
    assert!(e.contains("tokenizer.ggml.scores") && e.contains("10"), "{e}");
    let e = err(with_key(
        md(),
        "tokenizer.ggml.token_type",
        Some(MetaValue::Array(vec![MetaValue::I32(1); 3])),
    ));
    assert!(e.contains("tokenizer.ggml.token_type"), "{e}");
    let e = err(with_key(
        md(),
        "tokenizer.ggml.tokens",
        Some(MetaValue::Array(vec![MetaValue::U32(1)])),
    ));
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = err(with_key(md(), "tokenizer.ggml.model", Some(s("bert"))));
    assert!(e.contains("bert"), "{e}");
    // A BPE vocabulary needs merges and a known pre-tokenizer.
    let bpe = with_key(md(), "tokenizer.ggml.model", Some(s("gpt2")));
    let e = err(bpe.clone());
    assert!(e.contains("merges"), "{e}");
    let bpe = with_key(bpe, "tokenizer.ggml.merges", Some(MetaValue::Array(vec![s("h e")])));
    let e = err(with_key(bpe.clone(), "tokenizer.ggml.pre", Some(s("no-such-pre"))));
    assert!(e.contains("no-such-pre"), "{e}");
    // With those present the same file loads.
    assert!(Tokenizer::from_gguf(&gguf_from(with_key(bpe, "tokenizer.ggml.pre", Some(s("smollm"))))).is_ok());
}

#[test]
fn real_gguf_with_broken_tokenizer_metadata_is_an_error() {
    let mut f = open_model(SMOLLM2);
    f.metadata
        .insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(49152));
    let e = Tokenizer::from_gguf(&f).unwrap_err().to_string();
    assert!(e.contains("bos_token_id"), "{e}");
    f.metadata.remove("tokenizer.ggml.tokens");
    let e = Tokenizer::from_gguf(&f).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
}

// --- Hugging Face directory ---

#[test]
fn hf_dir_tokenizer() {
    let dir = std::env::temp_dir().join(format!("ffai-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), common::TINY_TOKENIZER_JSON).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{
          "add_bos_token": true,
          "bos_token": "<s>",
          "eos_token": {"content": "</s>", "special": true},
          "added_tokens_decoder": {
            "0": {"content": "<s>", "special": true},
            "1": {"content": "</s>", "special": true},
            "17": {"content": "<|turn|>", "special": true}
          },
          "chat_template": "{% for m in messages %}<|turn|>{{ m.content }}{% endfor %}"
        }"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 0, "eos_token_id": [1, 17]}"#,
    )
    .unwrap();

    let tok = Tokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).ok();
    let tok = tok.unwrap();

    assert!(tok.add_bos_default());
    assert_eq!(tok.vocab_size(), 18);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(0), Some(1)));
    assert_eq!(tok.eog_ids(), [1, 17]);
    assert!(tok.is_special(17) && !tok.is_special(13));
    assert_eq!(
        tok.chat_template(),
        Some("{% for m in messages %}<|turn|>{{ m.content }}{% endfor %}")
    );

    let text = "hello<|turn|>hello world";
    let ids = tok.encode(text, tok.add_bos_default()).unwrap();
    assert_eq!(ids, [0, 13, 17, 13, 16, 4, 9]);
    assert_eq!(tok.encode(text, false).unwrap(), ids[1..]);
    assert_eq!(tok.encode("<s>hello", true).unwrap(), [0, 13]);
    assert_eq!(tok.decode(&ids[1..]), text);
    assert_eq!(tok.decode(&ids), format!("<s>{text}"));
    assert_eq!(tok.token_bytes(16), b" wor");
    assert_eq!(tok.token_text(16), Some("Ġwor"));
    let (full, _) = stream(&tok, &ids[1..]);
    assert_eq!(full, text);

    let missing = Tokenizer::from_hf_dir(&std::env::temp_dir().join("ffai-no-such-dir"));
    assert!(missing.unwrap_err().to_string().contains("tokenizer.json"));
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    // Shared between threads, it gives the same answers.
    let tok = smollm2();
    let ids: Vec<Vec<u32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| sc.spawn(|| tok.encode("The capital of France is", false).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|v| v == &[504, 3575, 282, 4649, 314]));
}

/// SentencePiece-like tokenizer.json: Metaspace with the prefix only at the start, byte
/// fallback, BOS from the post-processor template.
const TINY_METASPACE_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
  },
  "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
    "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "i": 5, "▁h": 6, "▁hi": 7, "<0x0A>": 8},
    "merges": ["▁ h", "▁h i"]
  }
}"#;

#[test]
fn hf_dir_metaspace_tokenizer() {
    let dir = std::env::temp_dir().join(format!("ffai-tokenizer-test-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), TINY_METASPACE_JSON).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).ok();
    let tok = tok.unwrap();

    assert!(tok.add_bos_default(), "BOS comes from the post-processor template");
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.eog_ids(), [2]);
    let ids = tok.encode("hi hi\n", true).unwrap();
    assert_eq!(ids, [1, 7, 7, 8]);
    assert_eq!(tok.decode(&ids[1..]), "hi hi\n");
    assert_eq!(tok.token_bytes(7), b" hi");
    assert_eq!(tok.token_bytes(8), b"\n");
    let (full, _) = stream(&tok, &ids[1..]);
    assert_eq!(full, "hi hi\n");
}
