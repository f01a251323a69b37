//! Evaluation tools: a small Fashion-MNIST classifier whose penultimate activations serve as a
//! feature space, the Fréchet distance between Gaussian fits of two feature sets (the
//! "Fréchet distance on the Fashion-MNIST classifier's features" — deliberately not called FID,
//! since the feature network is ours, not Inception), and PNG image grids for inspection.
pub mod classifier;
pub mod frechet;
pub mod grid;

pub use classifier::{
    load_classifier, load_shipped, save_classifier, train_classifier, Classifier, ClassifierConfig,
    ClassifierInfo, ClassifierReport, ClassifierTrainConfig,
};
pub use frechet::{frechet_distance, frechet_distance_of, FeatureStats};
pub use grid::{make_grid, save_grid, save_grid_scaled, save_image};
