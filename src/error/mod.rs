//! The crate's error type: one enum with typed fields a caller can match on ([`Error`]),
//! the details some variants carry (`mismatch`, `mnist`), and how messages are written
//! (`message`: libtorch's text without C++ frames, the shared phrasings).

use tch::{Device, Kind};

mod convert;
mod message;
mod mismatch;
mod mnist;

pub(crate) use message::panic_message;
use message::{mnist_folder, name_problem, repeated_layer, unknown_layers};
pub use message::{strip_backtrace, torch_message};
pub use mismatch::Mismatch;
pub use mnist::MnistProblem;

/// Everything that can go wrong in this crate, each case naming the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error raised by libtorch itself; shown as its message without C++ stack frames
    /// (see [`torch_message`]), the full text stays in the field.
    #[error("{}", torch_message(.0))]
    Torch(tch::TchError),

    /// A tensor argument that is undefined (`Tensor::new()`).
    #[error("{0} is an undefined tensor (Tensor::new()): pass a tensor with data")]
    Undefined(&'static str),

    /// A bitwidth outside the supported range.
    #[error("bitwidth {0} is out of range: quantizers support 2..=16 bits")]
    Bitwidth(u32),

    /// A tensor of a dtype that cannot be quantized (integers, booleans, complex).
    #[error("cannot quantize a tensor of dtype {0:?}: expected Float, Double, Half or BFloat16")]
    Dtype(Kind),

    /// An input on another device than the quantizer's state.
    #[error("input is on {input:?} but {what} is on {state:?}: move one of them first")]
    Device {
        /// The input's device.
        input: Device,
        /// The device of the quantizer's state.
        state: Device,
        /// Which state, e.g. `PACT alpha`.
        what: &'static str,
    },

    /// An input with NaN or infinite values, reported under [`NonFinite::Reject`](crate::quantizers::NonFinite::Reject).
    #[error("input holds {count} non-finite value(s) (NaN or ±inf) out of {numel}")]
    NonFinite {
        /// How many elements are NaN or infinite.
        count: i64,
        /// The input's number of elements.
        numel: i64,
    },

    /// A numeric argument outside its domain.
    #[error("{what} must be {expected}, got {value}")]
    Argument {
        /// The argument's name.
        what: &'static str,
        /// The value given.
        value: f64,
        /// The domain, in words.
        expected: &'static str,
    },

    /// A thread count outside `0..=max` (0: libtorch's choice).
    #[error("{what} must be 0 (libtorch's default) up to {max} (four per core here), got {value}")]
    Threads {
        /// The argument's name, e.g. `--threads`.
        what: &'static str,
        /// The value given.
        value: i64,
        /// The largest accepted.
        max: i64,
    },

    /// A name that is none of its kind's: an inference mode, a quantizer kind, a model.
    #[error("unknown {what} {name:?}: expected {expected}")]
    Unknown {
        /// The kind of name, e.g. `inference mode`.
        what: &'static str,
        /// The name given.
        name: String,
        /// The names accepted, in words.
        expected: &'static str,
    },

    /// Per-channel quantization asked of a quantizer that has none.
    #[error("per-channel weight quantization needs MinMax, not {0}")]
    PerChannel(crate::quantizers::QuantizerKind),

    /// A tensor of the wrong shape.
    #[error("{what}: expected shape {expected}, got {actual:?}")]
    Shape {
        /// Which tensor.
        what: String,
        /// The expected shape, in words.
        expected: String,
        /// The shape given.
        actual: Vec<i64>,
    },

    /// An MNIST folder that does not exist, or lacks one of its four files.
    #[error("{}", mnist_folder(.dir, .missing.as_deref()))]
    MnistFolder {
        /// The folder.
        dir: std::path::PathBuf,
        /// The file it lacks (without `.gz`), or `None` when the folder itself is missing.
        missing: Option<&'static str>,
    },

    /// An IDX file that cannot be read as MNIST.
    #[error("{}: {problem}", crate::files::shown_path(path))]
    Mnist {
        /// The file (or the name an embedded file goes by).
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: MnistProblem,
    },

    /// A split whose image and label files disagree on the count.
    #[error("{split} split: {images} images but {labels} labels")]
    MnistSplit {
        /// `train` or `t10k`.
        split: &'static str,
        /// Images the image file's header promises.
        images: i64,
        /// Labels the label file's header promises.
        labels: i64,
    },

    /// Training and test images of different sizes.
    #[error("train images are {train:?} but test images are {test:?}")]
    MnistShapes {
        /// Rows and columns of the training images.
        train: Vec<i64>,
        /// Rows and columns of the test images.
        test: Vec<i64>,
    },

    /// libtorch's TorchScript API refused an operation on a module (its message, without C++
    /// frames): a submodule it cannot read, a `forward` it cannot compile.
    #[error("{0}")]
    TorchScript(String),

    /// A file that is not a TorchScript model (checked before libtorch reads it, or refused by libtorch).
    #[error("{}: not a TorchScript model ({why})", crate::files::shown_path(path))]
    NotTorchScript {
        /// The file.
        path: std::path::PathBuf,
        /// Why, in words.
        why: String,
    },

    /// A TorchScript model's `forward` refused an input.
    #[error("{}: the model rejected an input of shape {shape:?}: {why}", crate::files::shown_path(model))]
    InputRejected {
        /// The model's file.
        model: std::path::PathBuf,
        /// The input's shape.
        shape: Vec<i64>,
        /// libtorch's reason.
        why: String,
    },

    /// A model whose `forward` returned neither a tensor nor a tuple or list starting with one.
    #[error(
        "{}: the model's forward returned {returned}, not a tensor (or a tuple whose first element is one)",
        crate::files::shown_path(model)
    )]
    NotTensorOutput {
        /// The model's file.
        model: std::path::PathBuf,
        /// What it returned, in words.
        returned: String,
    },

    /// A model whose output is not `[N, classes]` float logits for `N` inputs.
    #[error("{}: expected float logits of shape [{n}, classes] for {n} inputs, the model returned {kind:?} of shape {shape:?}", crate::files::shown_path(model))]
    NotLogits {
        /// The model's file.
        model: std::path::PathBuf,
        /// The number of inputs.
        n: i64,
        /// The output's dtype.
        kind: Kind,
        /// The output's shape.
        shape: Vec<i64>,
    },

    /// A model with nothing for the operation to work on (`what` says what is missing).
    #[error("{}: {what}", crate::files::shown_path(model))]
    NothingToDo {
        /// The model's file.
        model: std::path::PathBuf,
        /// What is missing, e.g. `no quantizable weights (...)`.
        what: &'static str,
    },

    /// An operation given no data (`what` says which).
    #[error("{what}")]
    NoData {
        /// E.g. `calibration needs images, got none`.
        what: &'static str,
    },

    /// Images and labels of different counts.
    #[error("{images} images but {labels} labels")]
    CountMismatch {
        /// How many images.
        images: i64,
        /// How many labels.
        labels: i64,
    },

    /// Fine-tuning whose loss or weights stopped being finite; the weights were restored.
    #[error("fine-tuning diverged in epoch {epoch} ({what}); the weights are restored and nothing is written: try a smaller learning rate")]
    Diverged {
        /// The epoch (from 1).
        epoch: usize,
        /// What was not finite.
        what: String,
    },

    /// Per-layer settings that name no layer of the model.
    #[error("{}", unknown_layers(.unknown, .model.as_deref(), .known))]
    UnknownLayers {
        /// The names given that match nothing.
        unknown: Vec<String>,
        /// The model's file, where the names are its weights (post-training quantization).
        model: Option<std::path::PathBuf>,
        /// The names the model has.
        known: Vec<String>,
    },

    /// Per-layer settings that name one layer twice (`same_as`, the earlier name, may be spelled differently).
    #[error("{}", repeated_layer(.name, .same_as))]
    RepeatedLayer {
        /// The later name.
        name: String,
        /// The earlier one.
        same_as: String,
    },

    /// A layer the TorchScript rewrite cannot quantize, and why.
    #[error("{}: {problem}", crate::files::shown(layer))]
    RewriteLayer {
        /// The layer's path (or `the root module (the model itself)`).
        layer: String,
        /// Why, in words.
        problem: String,
    },

    /// A collective or the rendezvous of a process group failed: a peer is gone, did not
    /// answer within the timeout, or the ranks disagree.
    #[error("rank {rank}: {op} failed: {problem}")]
    Distributed {
        /// This process's rank.
        rank: i64,
        /// What was being done (`rendezvous`, `allreduce`, ...).
        op: &'static str,
        /// Why, in words (with libtorch's message).
        problem: String,
    },

    /// libtorch's CUDA library exists but would not load (a missing CUDA runtime library,
    /// a driver too old for it).
    #[error("{}: libtorch's CUDA library would not load: {problem}", crate::files::shown_path(path))]
    CudaLibrary {
        /// The library file.
        path: std::path::PathBuf,
        /// The dynamic loader's message.
        problem: String,
    },

    /// A torchrun environment variable that cannot be used.
    #[error("{name}={value:?}: {problem}")]
    DistEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// A data file or folder (CIFAR records, an image folder, a safetensors data set) that
    /// cannot be used, and why.
    #[error("{}: {problem}", crate::files::shown_path(path))]
    DataFile {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What is wrong with it, in words.
        problem: String,
    },

    /// A strict rewrite ([`RewriteConfig::strict`](crate::torchscript::RewriteConfig)) of a
    /// model where something would stay in float: each entry is `layer: reason`.
    #[error("strict rewrite refused: {} would stay in float: {}", .layers.len(), .layers.join("; "))]
    LeftInFloat {
        /// What would stay in float, each as `path: reason`.
        layers: Vec<String>,
    },

    /// A model the rewrite already quantized (`quantizer` is one of its quantizer modules).
    #[error("the model was quantized by this rewrite before ({quantizer} is a quantizer): load the original instead")]
    AlreadyRewritten {
        /// The path of a quantizer submodule.
        quantizer: String,
    },

    /// Two layers of one TorchScript class (so one `forward`) given different quantizers.
    #[error("layers {first} and {second} share the TorchScript class {class} and so one forward: give them the same quantizers and bits")]
    SharedClass {
        /// The first layer.
        first: String,
        /// The second layer.
        second: String,
        /// Their class.
        class: String,
    },

    /// A checkpoint name that does not end in `.safetensors` (the only format written).
    #[error("{}: checkpoints are written as .safetensors", crate::files::shown_path(path))]
    CheckpointName {
        /// The path given.
        path: std::path::PathBuf,
    },

    /// A checkpoint whose tensors do not match the model's variables; nothing was loaded.
    #[error("{} does not match the model: {}", crate::files::shown_path(path), Mismatch::list(.problems, "model"))]
    CheckpointMismatch {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// Every problem, by name.
        problems: Vec<Mismatch>,
    },

    /// A multiplier spec that names no multiplier.
    #[error("unknown multiplier {spec:?}: expected exact, truncated:K, mitchell, drum:K, an EvoApprox name (mul8s_1KV8, evoapprox:NAME; `multiplier --list`) or a table file")]
    UnknownMultiplier {
        /// The spec given.
        spec: String,
    },

    /// A multiplier's parameter outside its range (`drum:9`) or not a number (`drum:x`).
    #[error("{spec}: K must be {expected}")]
    MultiplierParameter {
        /// The spec given.
        spec: String,
        /// The accepted values, in words.
        expected: String,
    },

    /// A multiplier whose product does not fit a table entry (int32).
    #[error("multiplier {name}: product({a}, {b}) = {product} does not fit int32")]
    ProductOverflow {
        /// The multiplier.
        name: String,
        /// The first operand.
        a: i32,
        /// The second operand.
        b: i32,
        /// The product.
        product: i64,
    },

    /// A multiplier table file that cannot be used.
    #[error("multiplier table {}: {problem}", crate::files::shown_path(path))]
    MultiplierTable {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, in words.
        problem: String,
    },

    /// An operand of a table product that is not an integer in `[-128, 127]`.
    #[error(
        "{what} holds {value}: approximate products need integers in [-128, 127] (8-bit quantized values)"
    )]
    Operand {
        /// Which operand: `the input` or `the weight`.
        what: &'static str,
        /// The first offending value.
        value: f64,
    },

    /// Approximate mode asked of a layer whose quantizers are wider than 8 bits.
    #[error("approximate mode reads 8-bit tables (operands of 2 to 8 bits): the layer quantizes inputs to {x_bits} and weights to {w_bits} bits")]
    ApproxBits {
        /// Bits of the input quantizer.
        x_bits: u32,
        /// Bits of the weight quantizer.
        w_bits: u32,
    },

    /// Approximate mode without a multiplier.
    #[error("approximate mode needs a multiplier: call set_multiplier first")]
    NoMultiplier,

    /// Weights and buffers that do not fit a network (see [`import`](crate::import)); nothing
    /// was copied.
    #[error("{origin} does not fit the network: {}", Mismatch::list(.problems, "network"))]
    Import {
        /// Where the tensors come from (a file, a model).
        origin: String,
        /// Every problem, by name.
        problems: Vec<Mismatch>,
    },

    /// A layer or path name that a network cannot take: empty, holding a `.`, used twice.
    #[error("{}", name_problem(.what, .name, .problem))]
    BadName {
        /// Which name: `layer name`, `shortcut name`, `layer path`, or `""` (said in `problem`).
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it, in words.
        problem: &'static str,
    },

    /// A layer path that names no Approx layer of the network.
    #[error("no Approx layer named {0:?} in this network")]
    NoSuchLayer(String),

    /// A layer path and store that do not hold the layer a quantizer replacement was asked of.
    #[error("{0:?} in this VarStore is not this layer: give the layer's full path (its weight is `{0}.weight`) in the store the network was built in")]
    NotThisLayer(String),

    /// A user's module inside a network panicked; the panic's message, without C++ frames.
    #[error("the module panicked: {0}")]
    ModulePanicked(String),

    /// An error in one named part of a network, such as a layer of an
    /// [`ApproxSequential`](crate::layers::ApproxSequential).
    #[error("{name}: {error}")]
    In {
        /// The part's name, e.g. `layer1.0.conv2`.
        name: String,
        /// What went wrong there (in the message already, so not a `source()`).
        error: Box<Error>,
    },

    /// A file given as input that cannot be read: missing, a folder or special file, too large.
    #[error("{}: {problem}", crate::files::shown_path(path))]
    InputFile {
        /// The path as given.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: crate::files::FileProblem,
    },

    /// A destination that cannot receive a file, or a write that failed (nothing is replaced).
    #[error("cannot write {}: {problem}", crate::files::shown_path(path))]
    Output {
        /// The path as given.
        path: std::path::PathBuf,
        /// Why.
        problem: crate::files::OutputProblem,
    },

    /// A `.safetensors` file whose header or data is malformed (checked before its payload is read).
    #[error("{}: not a readable .safetensors file ({problem})", crate::files::shown_path(path))]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, in words.
        problem: String,
    },

    /// A tensor holding NaN or ±inf where only finite values are usable (a loaded or
    /// imported weight, or a variable about to be saved).
    #[error(
        "{origin}: {} holds {count} non-finite value(s) (NaN or ±inf) of {numel}",
        crate::files::shown(name)
    )]
    NonFiniteTensor {
        /// Where the tensor comes from or goes to, e.g. the file.
        origin: String,
        /// The tensor's name.
        name: String,
        /// How many of its values are not finite.
        count: i64,
        /// Its number of values.
        numel: i64,
    },

    /// Loaded quantizer state outside its own domain, such as a PACT `alpha` of 0 or less.
    #[error("{origin}: {} is {value}, but {expected}", crate::files::shown(name))]
    QuantizerState {
        /// Where the state comes from.
        origin: String,
        /// The variable's name, e.g. `conv1.x_quantizer.alpha`.
        name: String,
        /// The offending value.
        value: f64,
        /// What the state must be, in words.
        expected: &'static str,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
