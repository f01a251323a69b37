//! Evaluation tools: a small classifier (shipped for Fashion-MNIST, trainable on users' data) whose
//! penultimate activations serve as a feature space, the Fréchet distance between Gaussian fits of
//! two feature sets (the "Fréchet distance on the Fashion-MNIST classifier's features" — deliberately
//! not called FID, since the feature network is ours, not Inception), control-fidelity metrics (how
//! well samples obey their condition), video metrics, PNG image grids for inspection, and PNG line
//! plots.
pub mod classifier;
pub mod curves;
pub mod stats;
pub mod flops;
pub mod disentangle;
pub mod fidelity;
pub mod frechet;
pub mod grid;
pub mod loss_gain;
pub mod plot;
pub mod seeds;
pub mod video;

pub use classifier::{
    load_classifier, load_classifier_dir, load_shipped, save_classifier, train_classifier, train_data_classifier,
    Classifier, ClassifierConfig, ClassifierData, ClassifierInfo, ClassifierReport, ClassifierRunConfig,
    ClassifierTrainConfig,
};
pub use fidelity::{fidelity, higher_is_better, metric_name, FidelityScore};
pub use frechet::{frechet_distance, frechet_distance_of, FeatureStats};
pub use grid::{make_grid, save_grid, save_grid_scaled, save_image};
pub use plot::{line_plot, PlotSpec, Series};
