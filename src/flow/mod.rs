//! Flow matching: torchcfm's conditional flow matchers, exact optimal-transport pairing, and the
//! ODE solvers that sample from a velocity field.
pub mod matchers;
pub mod ode;
pub mod ode_graph;
pub mod ot;
