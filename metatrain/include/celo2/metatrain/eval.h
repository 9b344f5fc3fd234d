// The evaluation of meta-trained weights (docs/METATRAIN.md): each theta, the constructed
// Adam-like theta and AdamW at the best of a learning-rate grid, trained on the same
// initializations and batches, on the meta-training task and on held-out tasks:
//   fashion8      Fashion-MNIST 8×8, MLP 64-32-10, batch 64 (the meta-training task)
//   fashion28     Fashion-MNIST 28×28, MLP 784-128-10 (held out: input size, width)
//   digits-deep   scikit-learn digits 8×8, MLP 64-128-128-10 (held out: depth, width; the
//                 data set is one of the meta-training sources)
//   cancer        scikit-learn breast cancer, standardized, MLP 30-64-64-2 (held out: tabular
//                 data, 2 classes, 400 training rows; not in the default --tasks)
// With --base every theta is a Celo2-base theta and runs the Celo2-base recipe (every tensor
// celo2, as its meta-training); otherwise Celo2's (AdamW at 20·lr on /b$).
// Reported per (task, optimizer): the mean training loss over the last 100 steps and the
// test accuracy, each averaged over the seeds.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace celo2::meta {

struct EvalArgs {
  std::vector<std::string> thetas;  // "label=path" or "path"
  // "label=path" evaluated when the file exists (weights a user downloads, e.g. the
  // published ones); said absent, and recorded so in the JSON, when not.
  std::vector<std::string> optional_thetas;
  bool base = false;  // Celo2-base
  std::vector<std::string> tasks = {"fashion8", "fashion28", "digits-deep"};
  std::vector<double> adamw_lrs = {1e-3, 3e-3, 1e-2, 3e-2};
  std::vector<int> steps;  // per task; empty = task default
  int seeds = 2;
  bool adam_like = true;
  bool adamw = true;  // the AdamW grid (--no-adamw: only the thetas, e.g. to add one to a table)
  std::string json_path;
};

void add_eval_options(CLI::App& app, EvalArgs& a);
int run_eval(const EvalArgs& a);

}  // namespace celo2::meta
