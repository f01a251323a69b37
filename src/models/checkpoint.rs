//! Activation recomputation (diffusers' `gradient_checkpointing`): a block run under [`checkpoint`] keeps
//! only its inputs for backward; its intermediate activations are freed after the forward pass and
//! recomputed, block by block, when backward reaches it.
//!
//! Why a custom autograd function in the C++ shim (`csrc/checkpoint.cpp`) calling back into the Rust block,
//! rather than recomputing in Rust: tch 0.26 binds no custom autograd function, and the alternative — running
//! the forward without a graph and a second, hand-driven backward pass per block — splits one backward into
//! several, each its own `backward` call with gradients stitched by hand. The custom function keeps one
//! backward schedule: libtorch's engine reaches each recomputed block in order, as PyTorch's reentrant
//! `torch.utils.checkpoint` does, and gradients accumulate into the parameters exactly where the plain
//! backward puts them (a data-parallel average after backward sees the same gradients).
//!
//! The recomputation runs under the same mixed-precision region as the first run (captured at forward).
//! The blocks here draw no random numbers (no dropout), so the recomputed activations are the first run's.
use std::ffi::{c_char, c_int, c_void};

use tch::Tensor;

use crate::models::precision::{compute_kind, with_compute_kind};
use crate::{Error, Result};

/// A block under recomputation: inputs in, outputs out. It is called once in the forward pass and once more
/// in backward, with the same inputs.
pub type Block = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>;

/// Whether this build has the recomputation shim (libtorch's autograd headers were found when it was built).
pub fn available() -> bool {
    cfg!(lisa_checkpoint)
}

/// Runs `block` on `inputs` with its activations recomputed in backward instead of kept; returns its outputs.
/// Gradients reach the block's parameters and every input that requires them. Without autograd (no tensor
/// needs a gradient, or grad mode off) the block simply runs once.
pub fn checkpoint(inputs: &[&Tensor], block: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Tensor>> {
    let kind = compute_kind();
    let boxed: Box<Box<Block>> = Box::new(Box::new(move |xs: &[Tensor]| with_compute_kind(kind, || block(xs))));
    run(inputs, boxed)
}

#[cfg(lisa_checkpoint)]
mod ffi {
    use super::*;

    pub type PushFn = unsafe extern "C" fn(out: *mut c_void, t: *const c_void);
    pub type FailFn = unsafe extern "C" fn(out: *mut c_void, msg: *const c_char, len: usize);
    pub type RunFn = unsafe extern "C" fn(
        block: *mut c_void,
        inputs: *const *mut c_void,
        n: c_int,
        out: *mut c_void,
        push: PushFn,
        fail: FailFn,
    );
    pub type DropFn = unsafe extern "C" fn(block: *mut c_void);

    extern "C" {
        pub fn lisa_checkpoint(
            block: *mut c_void,
            run: RunFn,
            drop: DropFn,
            inputs: *const *mut c_void,
            n: c_int,
            sink: *mut c_void,
            push: PushFn,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn lisa_checkpoint_free(s: *mut c_char);
    }

    /// Called by the shim (forward, and again in backward): runs the block on shallow copies of the inputs
    /// and hands each output back. A Rust error or panic becomes the shim's error, never an unwind into C++.
    pub unsafe extern "C" fn run_block(
        block: *mut c_void,
        inputs: *const *mut c_void,
        n: c_int,
        out: *mut c_void,
        push: PushFn,
        fail: FailFn,
    ) {
        let block = &*(block as *const Box<Block>);
        let xs: Vec<Tensor> = (0..n as usize).map(|i| Tensor::clone_from_ptr(*inputs.add(i) as *mut _)).collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block(&xs)));
        match result {
            Ok(Ok(ys)) => {
                for y in &ys {
                    push(out, y.as_ptr() as *const c_void);
                }
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                fail(out, msg.as_ptr() as *const c_char, msg.len());
            }
            Err(_) => {
                let msg = "checkpoint: the block panicked";
                fail(out, msg.as_ptr() as *const c_char, msg.len());
            }
        }
    }

    /// Called by the shim when the autograd node (or a failed call) lets go of the block.
    pub unsafe extern "C" fn drop_block(block: *mut c_void) {
        drop(Box::from_raw(block as *mut Box<Block>));
    }

    /// Collects the outputs the shim hands back.
    pub unsafe extern "C" fn collect(sink: *mut c_void, t: *const c_void) {
        (*(sink as *mut Vec<Tensor>)).push(Tensor::clone_from_ptr(t as *mut _));
    }
}

#[cfg(lisa_checkpoint)]
fn run(inputs: &[&Tensor], block: Box<Box<Block>>) -> Result<Vec<Tensor>> {
    let ptrs: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut outputs: Vec<Tensor> = Vec::new();
    let mut err: *mut c_char = std::ptr::null_mut();
    // The shim owns the block from here on and frees it through `drop_block`, also when it fails.
    let rc = unsafe {
        ffi::lisa_checkpoint(
            Box::into_raw(block) as *mut c_void,
            ffi::run_block,
            ffi::drop_block,
            ptrs.as_ptr(),
            ptrs.len() as c_int,
            &mut outputs as *mut Vec<Tensor> as *mut c_void,
            ffi::collect,
            &mut err,
        )
    };
    if rc != 0 {
        let msg = if err.is_null() {
            "unknown error".to_string()
        } else {
            let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
            unsafe { ffi::lisa_checkpoint_free(err) };
            s
        };
        return Err(Error::Training(format!("activation recomputation: {msg}")));
    }
    Ok(outputs)
}

#[cfg(not(lisa_checkpoint))]
fn run(_inputs: &[&Tensor], _block: Box<Box<Block>>) -> Result<Vec<Tensor>> {
    Err(Error::Config(
        "train.gradient_checkpointing needs the activation-recomputation shim, which this build lacks (libtorch's \
         autograd headers were not found when it was built); rebuild with LIBTORCH pointing at a full libtorch, or \
         set train.gradient_checkpointing = false"
            .into(),
    ))
}

#[cfg(all(test, lisa_checkpoint))]
mod tests {
    use super::*;
    use tch::{nn, nn::Module, Device, Kind};

    const TEST_KIND: Kind = Kind::Double;

    /// A two-layer block with a nonlinearity, so that its backward needs its intermediate activation.
    fn block(vs: &nn::Path) -> (nn::Linear, nn::Linear) {
        let c = nn::LinearConfig::default();
        (nn::linear(vs / "a", 4, 6, c), nn::linear(vs / "b", 6, 3, c))
    }

    fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(k, t)| (k, t.grad().copy())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn gradients_equal_the_plain_backward_for_parameters_and_inputs() {
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(TEST_KIND);
        let (a, b) = block(&vs.root());
        let x = Tensor::randn([5, 4], (TEST_KIND, Device::Cpu)).set_requires_grad(true);
        let y = Tensor::randn([5, 4], (TEST_KIND, Device::Cpu)); // an input that needs no gradient

        let plain = |x: &Tensor, y: &Tensor| -> Vec<Tensor> {
            let h = a.forward(&(x * y)).tanh();
            vec![b.forward(&h), h.sum(Kind::Double)]
        };
        let outs = plain(&x, &y);
        (outs[0].square().sum(Kind::Double) + &outs[1] * 0.5).backward();
        let (want, want_x) = (grads(&vs), x.grad().copy());
        for mut t in vs.trainable_variables() {
            t.zero_grad();
        }
        let _ = x.grad().zero_();

        let (a2, b2) = (a.ws.shallow_clone(), b.ws.shallow_clone());
        let (ab, bb) = (a.bs.as_ref().unwrap().shallow_clone(), b.bs.as_ref().unwrap().shallow_clone());
        let outs = checkpoint(&[&x, &y], move |xs| {
            let h = (xs[0].f_mul(&xs[1])?.f_matmul(&a2.tr())? + &ab).tanh();
            Ok(vec![h.matmul(&b2.tr()) + &bb, h.sum(Kind::Double)])
        })
        .unwrap();
        assert!(outs[0].requires_grad());
        (outs[0].square().sum(Kind::Double) + &outs[1] * 0.5).backward();
        for ((name, g), (_, w)) in grads(&vs).iter().zip(&want) {
            let d = (g - w).abs().max().double_value(&[]);
            assert!(d < 1e-12, "{name}: differs by {d}");
        }
        assert!((x.grad() - want_x).abs().max().double_value(&[]) < 1e-12);
    }

    #[test]
    fn the_block_runs_again_in_backward_once_and_without_autograd_only_once() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = checkpoint(&[&x], |_| Err(Error::Config("the block refuses".into()))).unwrap_err().to_string();
        assert!(e.contains("the block refuses"), "{e}");
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let counted = |count: &Arc<AtomicUsize>| {
            let c = count.clone();
            move |xs: &[Tensor]| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(vec![xs[0].square()])
            }
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let out = checkpoint(&[&x], counted(&runs)).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "forward");
        out[0].sum(Kind::Float).backward();
        assert_eq!(runs.load(Ordering::SeqCst), 2, "recomputed once in backward");
        assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![2.0, 2.0]);
        let runs = Arc::new(AtomicUsize::new(0));
        let out = tch::no_grad(|| checkpoint(&[&x], counted(&runs))).unwrap();
        assert!(!out[0].requires_grad());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
