//! Custom autograd nodes whose forward and backward are Rust functions (`autograd.cpp`), so a
//! quantizer's straight-through gradient is one native node.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use super::{c_error, check, CTensor};
use crate::{Error, Result};

extern "C" {
    fn ta_function_apply(
        fwd: *mut c_void,
        bwd: *mut c_void,
        params: *const c_void,
        params_len: usize,
        inputs: *const *const CTensor,
        n_inputs: i64,
        outputs: *mut *mut CTensor,
        n_outputs: *mut i64,
    ) -> *mut c_char;
    fn ta_convolution_backward(
        g: *const CTensor,
        x: *const CTensor,
        w: *const CTensor,
        geometry: *const i64,
        mask: *const u8,
        gx: *mut *mut CTensor,
        gw: *mut *mut CTensor,
        gb: *mut *mut CTensor,
    ) -> *mut c_char;
}

/// Most outputs, saved tensors or inputs a node has (the glue's fixed arrays).
const MAX: usize = 8;

/// A node's forward: its outputs and the tensors its backward needs.
pub(crate) type Forward<P> = fn(&P, &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)>;
/// A node's backward: from the saved tensors, the outputs' gradients and which inputs want
/// one, a gradient per input (`None` for none). The last slice says, per output, whether its
/// gradient is held by nothing but this call, so that it may be overwritten in place (a
/// weight-sized gradient then costs no fresh allocation).
pub(crate) type Backward<P> = fn(&P, &[Tensor], &[Tensor], &[bool], &[bool]) -> Result<Vec<Option<Tensor>>>;

/// What the node carries: the two functions and their parameters, copied as bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Packet<P: Copy> {
    fwd: Forward<P>,
    bwd: Backward<P>,
    params: P,
}

/// Borrowed tensor pointers from the glue as owned handles (shallow clones).
///
/// SAFETY: `ptrs` holds `n` valid tensor pointers.
unsafe fn handles(ptrs: *const *mut CTensor, n: i64) -> Vec<Tensor> {
    (0..n as usize).map(|i| Tensor::clone_from_ptr(*ptrs.add(i))).collect()
}

/// Hands `tensors` over to the glue, which takes ownership.
fn hand_over(tensors: Vec<Tensor>, out: *mut *mut CTensor) -> std::result::Result<(), String> {
    if tensors.len() > MAX {
        return Err(format!("a node returned {} tensors, at most {MAX} are supported", tensors.len()));
    }
    for (i, mut t) in tensors.into_iter().enumerate() {
        // SAFETY: `out` has MAX slots; the glue deletes each pointer it receives.
        unsafe { *out.add(i) = t.as_mut_ptr() };
        std::mem::forget(t);
    }
    Ok(())
}

fn run_callback(f: impl FnOnce() -> std::result::Result<(), String>) -> *mut c_char {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(msg)) => c_error(&msg),
        Err(panic) => {
            let msg = crate::error::panic_message(&*panic)
                .unwrap_or_else(|| "panic in a Rust autograd callback".into());
            c_error(&msg)
        }
    }
}

extern "C" fn forward_trampoline<P: Copy>(
    params: *const c_void,
    inputs: *const *mut CTensor,
    n_inputs: i64,
    outputs: *mut *mut CTensor,
    saved: *mut *mut CTensor,
) -> *mut c_char {
    run_callback(|| {
        // SAFETY: the bytes of a Packet<P> written by `apply`; possibly unaligned in the node.
        let packet = unsafe { std::ptr::read_unaligned(params as *const Packet<P>) };
        let inputs = unsafe { handles(inputs, n_inputs) };
        let (outs, keep) = (packet.fwd)(&packet.params, &inputs).map_err(|e| e.to_string())?;
        hand_over(outs, outputs)?;
        hand_over(keep, saved)
    })
}

extern "C" fn backward_trampoline<P: Copy>(
    params: *const c_void,
    saved: *const *mut CTensor,
    n_saved: i64,
    grads: *const *mut CTensor,
    n_grads: i64,
    needs: *const u8,
    owned: *const u8,
    grad_inputs: *mut *mut CTensor,
) -> *mut c_char {
    run_callback(|| {
        // SAFETY: as in forward_trampoline; the glue passes valid saved and gradient tensors.
        let packet = unsafe { std::ptr::read_unaligned(params as *const Packet<P>) };
        let (saved, grads) = unsafe { (handles(saved, n_saved), handles(grads, n_grads)) };
        // The glue passes one flag per input; the node's functions know how many inputs they have.
        let needs: Vec<bool> = (0..MAX).map(|i| unsafe { *needs.add(i) } != 0).collect();
        // One flag per output's gradient, MAX slots as `needs`.
        let owned: Vec<bool> = (0..MAX).map(|i| unsafe { *owned.add(i) } != 0).collect();
        let result =
            (packet.bwd)(&packet.params, &saved, &grads, &needs, &owned).map_err(|e| e.to_string())?;
        if result.len() > MAX {
            return Err(format!("a node returned {} gradients, at most {MAX} are supported", result.len()));
        }
        for (i, g) in result.into_iter().enumerate() {
            if let Some(mut g) = g {
                // SAFETY: one slot per input, allocated by the glue, which takes ownership.
                unsafe { *grad_inputs.add(i) = g.as_mut_ptr() };
                std::mem::forget(g);
            }
        }
        Ok(())
    })
}

/// Runs `fwd` on `inputs` as one autograd node whose backward is `bwd`.
///
/// Where no input requires a gradient (or grad mode is off) no node is recorded and the
/// outputs are `fwd`'s as they are. `fwd` runs with grad mode off.
pub(crate) fn apply<P: Copy + 'static>(
    params: P,
    inputs: &[&Tensor],
    fwd: Forward<P>,
    bwd: Backward<P>,
) -> Result<Vec<Tensor>> {
    if inputs.len() > MAX {
        return Err(Error::Argument {
            what: "node inputs",
            value: inputs.len() as f64,
            expected: "at most 8",
        });
    }
    let packet = Packet { fwd, bwd, params };
    let ptrs: Vec<*const CTensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut outs = [std::ptr::null_mut::<CTensor>(); MAX];
    let mut n_out = 0i64;
    // SAFETY: the packet is plain data read back with read_unaligned; the tensor pointers
    // are valid for the call; the glue writes at most MAX outputs, each owned by us after.
    let err = unsafe {
        ta_function_apply(
            forward_trampoline::<P> as *mut c_void,
            backward_trampoline::<P> as *mut c_void,
            &packet as *const Packet<P> as *const c_void,
            std::mem::size_of::<Packet<P>>(),
            ptrs.as_ptr(),
            ptrs.len() as i64,
            outs.as_mut_ptr(),
            &mut n_out,
        )
    };
    check(err).map_err(|msg| Error::Torch(tch::TchError::Torch(msg)))?;
    // SAFETY: n_out tensors, each a fresh `new at::Tensor` that we now own.
    Ok((0..n_out as usize).map(|i| unsafe { Tensor::from_ptr(outs[i]) }).collect())
}

/// The gradients of a 2-D convolution where `want` asks: of `x`, of `w` and of a bias of
/// `w`'s output channels.
pub(crate) type ConvGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// libtorch's convolution backward: the gradients (where `want` asks) of a 2-D convolution
/// with `geometry` `[stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups]` whose
/// output's gradient is `g`.
pub(crate) fn convolution_backward(
    g: &Tensor,
    x: &Tensor,
    w: &Tensor,
    geometry: [i64; 7],
    want: [bool; 3],
) -> Result<ConvGrads> {
    let mask = want.map(u8::from);
    let mut out: [*mut CTensor; 3] = [std::ptr::null_mut(); 3];
    let [gx, gw, gb] = &mut out;
    let err = unsafe {
        ta_convolution_backward(
            g.as_ptr(),
            x.as_ptr(),
            w.as_ptr(),
            geometry.as_ptr(),
            mask.as_ptr(),
            gx,
            gw,
            gb,
        )
    };
    // SAFETY: non-null pointers are fresh `new at::Tensor`s that the glue hands over.
    let [gx, gw, gb] = out.map(|p| (!p.is_null()).then(|| unsafe { Tensor::from_ptr(p) }));
    check(err).map_err(|msg| Error::Torch(tch::TchError::Torch(msg)))?;
    Ok((gx, gw, gb))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tch::{Device, Kind, Tensor};

    use super::{apply, convolution_backward};
    use crate::Result;

    /// What the identity node's backward was told about its gradient, per call.
    static OWNED: Mutex<Vec<bool>> = Mutex::new(Vec::new());

    fn identity_forward(_: &(), t: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        Ok((vec![t[0].copy()], vec![]))
    }

    fn identity_backward(
        _: &(),
        _: &[Tensor],
        g: &[Tensor],
        _: &[bool],
        owned: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        OWNED.lock().unwrap().push(owned[0]);
        let result = g[0].copy();
        if owned[0] {
            // Scribble over it where allowed: if anything else read it, its gradient would be NaN.
            let _ = g[0].shallow_clone().f_fill_(f64::NAN)?;
        }
        Ok(vec![Some(result)])
    }

    #[test]
    fn a_gradient_is_owned_only_where_nothing_else_holds_its_memory() {
        let o = (Kind::Double, Device::Cpu);
        // `loss(y, v)`: `v` a node made before `y`'s, so that the engine runs it after.
        let owned_in = |loss: &dyn Fn(&Tensor, &Tensor) -> Tensor| -> bool {
            tch::manual_seed(1);
            let w = Tensor::randn([5, 4], o).set_requires_grad(true);
            let u = Tensor::randn([5, 4], o).set_requires_grad(true);
            let v = &u * 1.0;
            let y = apply((), &[&w], identity_forward, identity_backward).unwrap().remove(0);
            OWNED.lock().unwrap().clear();
            loss(&y, &v).backward();
            // Both gradients arrive unchanged, whichever way the node was allowed to go.
            let (w2, u2) = (w.detach().set_requires_grad(true), u.detach().set_requires_grad(true));
            loss(&w2, &(&u2 * 1.0)).backward();
            for (ours, theirs) in [(w.grad(), w2.grad()), (u.grad(), u2.grad())] {
                let diff = (ours - theirs).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "gradient differs by {diff}");
            }
            let calls = OWNED.lock().unwrap().clone();
            assert_eq!(calls.len(), 1, "one backward call");
            calls[0]
        };
        let c = Tensor::randn([5, 4], o);
        let x = Tensor::randn([3, 4], o);
        // A product's fresh gradient, and a linear layer's (the transpose of a fresh product).
        assert!(owned_in(&|y, v| (y * &c).sum(Kind::Double) + (v * &c).sum(Kind::Double)));
        assert!(
            owned_in(&|y, v| (x.linear::<Tensor>(y, None) * 3.0).sum(Kind::Double) + v.sum(Kind::Double))
        );
        // A sum's gradient is one value expanded; a sum of two tensors hands both the same
        // gradient, which `v`'s node, still to run, holds: neither may be written.
        assert!(!owned_in(&|y, v| y.sum(Kind::Double) + v.sum(Kind::Double)));
        assert!(!owned_in(&|y, v| ((y + v) * &c).sum(Kind::Double)));
    }

    #[test]
    fn convolution_backward_equals_autograd_and_refuses_mismatched_shapes_in_one_line() {
        tch::manual_seed(3);
        let o = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([2, 4, 7, 6], o).set_requires_grad(true);
        let w = Tensor::randn([6, 2, 3, 3], o).set_requires_grad(true);
        let b = Tensor::randn([6], o).set_requires_grad(true);
        let y = x.conv2d(&w, Some(&b), [2, 1], [1, 0], [1, 2], 2);
        let g = y.rand_like();
        (&y * &g).sum(Kind::Double).backward();
        let geometry = [2, 1, 1, 0, 1, 2, 2];
        let (gx, gw, gb) =
            convolution_backward(&g, &x.detach(), &w.detach(), geometry, [true, true, true]).unwrap();
        for (ours, theirs) in [(gx, x.grad()), (gw, w.grad()), (gb, b.grad())] {
            let diff = (ours.unwrap() - theirs).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "differs by {diff}");
        }
        let (gx, gw, gb) =
            convolution_backward(&g, &x.detach(), &w.detach(), geometry, [false, true, false]).unwrap();
        assert!(gx.is_none() && gw.is_some() && gb.is_none(), "only the gradients asked for");
        // A weight of other input channels: libtorch's error as one line, no C++ frames.
        let bad = Tensor::randn([6, 3, 3, 3], o);
        let err = convolution_backward(&g, &x.detach(), &bad, geometry, [true, true, true])
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight of size [6, 3, 3, 3]") && !err.contains('\n'), "one line: {err}");
    }
}
