// Activation recomputation for the Rust side (src/models/checkpoint.rs): a torch::autograd::Function whose
// forward runs a Rust block without recording a graph, keeping only its inputs, and whose backward runs the
// block again with a graph and back-propagates through it, as PyTorch's reentrant checkpoint does. The block is
// a Rust closure reached through a function pointer; the autograd node owns it and frees it through `drop`.
// Exceptions never unwind into Rust: every entry point returns an error string instead.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

// What a block run writes: its output tensors, or why it failed.
struct LisaCheckpointOutputs {
  std::vector<at::Tensor> tensors;
  std::string error;
};

extern "C" void lisa_checkpoint_push(void* out, const at::Tensor* t) {
  static_cast<LisaCheckpointOutputs*>(out)->tensors.push_back(*t);
}

extern "C" void lisa_checkpoint_fail(void* out, const char* msg, size_t len) {
  static_cast<LisaCheckpointOutputs*>(out)->error.assign(msg, len);
}

namespace {

using PushFn = void (*)(void*, const at::Tensor*);
using FailFn = void (*)(void*, const char*, size_t);
// Runs the block on `inputs`, calling `push` once per output or `fail` once.
using RunFn = void (*)(void* block, at::Tensor* const* inputs, int n, void* out, PushFn push, FailFn fail);
using DropFn = void (*)(void* block);

// The Rust block, owned by the autograd node that may recompute it.
struct RustBlock : torch::CustomClassHolder {
  void* block;
  RunFn run_fn;
  DropFn drop_fn;
  RustBlock(void* b, RunFn r, DropFn d) : block(b), run_fn(r), drop_fn(d) {}
  ~RustBlock() override { drop_fn(block); }

  std::vector<at::Tensor> run(std::vector<at::Tensor> inputs) const {
    std::vector<at::Tensor*> ptrs;
    for (auto& t : inputs) ptrs.push_back(&t);
    LisaCheckpointOutputs out;
    run_fn(block, ptrs.data(), static_cast<int>(ptrs.size()), &out, lisa_checkpoint_push, lisa_checkpoint_fail);
    if (!out.error.empty()) throw std::runtime_error(out.error);
    return std::move(out.tensors);
  }
};

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  // Autograd is off here (Function::apply disables it around forward): the block's activations are freed
  // as soon as its outputs exist.
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, c10::intrusive_ptr<RustBlock> block,
      at::TensorList inputs) {
    ctx->save_for_backward(inputs.vec());
    auto outputs = block->run(inputs.vec());
    ctx->saved_data["block"] = c10::IValue::make_capsule(std::move(block));
    return outputs;
  }

  // The block again, this time recording a graph from detached copies of its inputs; then the gradients of
  // its outputs are propagated through that graph, accumulating into the block's parameters, and the inputs'
  // gradients are returned.
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto holder = ctx->saved_data["block"].toCapsule();
    auto* block = static_cast<RustBlock*>(holder.get());
    std::vector<at::Tensor> detached;
    for (auto& x : saved) {
      auto d = x.detach();
      d.requires_grad_(x.requires_grad());
      detached.push_back(d);
    }
    std::vector<at::Tensor> outputs;
    {
      at::AutoGradMode enable(true);
      outputs = block->run(detached);
    }
    if (outputs.size() != grad_outputs.size()) {
      throw std::runtime_error(
          "checkpoint: the recomputed block returned " + std::to_string(outputs.size()) + " outputs, the first run " +
          std::to_string(grad_outputs.size()));
    }
    torch::autograd::variable_list roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    // One gradient per forward argument: none for the block, then one per input.
    torch::autograd::variable_list result{torch::autograd::Variable()};
    for (auto& d : detached) result.push_back(d.requires_grad() ? d.grad() : torch::autograd::Variable());
    return result;
  }
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace

extern "C" {

// Runs `block` on `inputs` under a checkpoint. Takes ownership of `block` (freed through `drop_fn`, also on
// error). Each output is handed to `push(sink, tensor)`. Returns 0, or 1 with a malloc'd message in `*err`.
int lisa_checkpoint(
    void* block, RunFn run_fn, DropFn drop_fn, at::Tensor* const* inputs, int n, void* sink, PushFn push,
    char** err) {
  try {
    auto holder = c10::make_intrusive<RustBlock>(block, run_fn, drop_fn);
    torch::autograd::variable_list in;
    for (int i = 0; i < n; ++i) in.push_back(*inputs[i]);
    torch::autograd::variable_list out;
    if (at::GradMode::is_enabled()) {
      // As a TensorList, so that autograd counts each input as one (a std::vector would be one opaque argument).
      out = Checkpoint::apply(std::move(holder), at::TensorList(in));
    } else {
      // Nothing will be differentiated: run the block once, plainly.
      out = holder->run(in);
    }
    for (auto& t : out) push(sink, &t);
    return 0;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return 1;
}

void lisa_checkpoint_free(char* s) { std::free(s); }

}  // extern "C"
