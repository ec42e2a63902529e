//! Native core of dt-lora: seeded Scrambled-Grid plans and tile kernels.
//!
//! The pure-Rust modules (`perm`, `grid`) build and test without Python; the
//! `python` feature adds the `dt_lora._native` extension module on top.

pub mod grid;
pub mod perm;

/// An invalid shape, grid or plan (surfaces in Python as `ValueError`), or
/// memory that could not be allocated (`MemoryError`): the kernels return
/// errors instead of aborting the interpreter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridError {
    message: String,
    out_of_memory: bool,
}

impl GridError {
    pub fn new(message: impl Into<String>) -> Self {
        GridError {
            message: message.into(),
            out_of_memory: false,
        }
    }

    pub fn out_of_memory(message: impl Into<String>) -> Self {
        GridError {
            message: message.into(),
            out_of_memory: true,
        }
    }

    pub fn is_out_of_memory(&self) -> bool {
        self.out_of_memory
    }
}

impl std::fmt::Display for GridError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GridError {}

#[cfg(feature = "python")]
mod python {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use numpy::{
        PyArray1, PyArray3, PyArrayMethods, PyReadonlyArray3, PyReadonlyArrayDyn,
        PyReadwriteArrayDyn, PyUntypedArrayMethods,
    };
    use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
    use pyo3::prelude::*;

    use crate::GridError;
    use crate::grid::{self, Dims, Layout};
    use crate::perm::{self, PlanSpec};

    impl From<GridError> for PyErr {
        fn from(err: GridError) -> PyErr {
            if err.out_of_memory {
                PyMemoryError::new_err(err.message)
            } else {
                PyValueError::new_err(err.message)
            }
        }
    }

    /// Run `work` without the GIL. A panic (a bug: inputs are validated
    /// first) becomes a `RuntimeError` instead of crossing into Python.
    fn run_detached<R: Send>(
        py: Python<'_>,
        work: impl FnOnce() -> Result<R, GridError> + Send,
    ) -> PyResult<R> {
        py.detach(|| catch_unwind(AssertUnwindSafe(work)))
            .map_err(|_| {
                PyRuntimeError::new_err("dt_lora._native: internal error (panic) in native kernel")
            })?
            .map_err(PyErr::from)
    }

    fn contiguous<'a, T: numpy::Element>(
        slice: Result<&'a [T], numpy::AsSliceError>,
        name: &str,
    ) -> PyResult<&'a [T]> {
        slice.map_err(|_| PyValueError::new_err(format!("{name} must be a C-contiguous array")))
    }

    fn shape4(shape: &[usize], name: &str) -> PyResult<[usize; 4]> {
        <[usize; 4]>::try_from(shape)
            .map_err(|_| PyValueError::new_err(format!("{name} must be 4-D, got shape {shape:?}")))
    }

    /// A plan as the kernels want it.
    struct KernelPlan {
        grid: (usize, usize),
        tiles: Vec<u32>,
        codes: Vec<u8>,
    }

    /// `(tiles int64 (n, rows, cols), transforms uint8 (n, rows, cols))`.
    type PlanArrays<'py> = (Bound<'py, PyArray3<i64>>, Bound<'py, PyArray3<u8>>);

    fn plan_from_arrays(
        tiles: &PyReadonlyArray3<'_, i64>,
        transforms: &PyReadonlyArray3<'_, u8>,
    ) -> PyResult<KernelPlan> {
        let shape = tiles.shape();
        if transforms.shape() != shape {
            return Err(PyValueError::new_err(format!(
                "plan tiles {:?} and transforms {:?} differ in shape",
                shape,
                transforms.shape()
            )));
        }
        let grid = (shape[1], shape[2]);
        // Out-of-range values become u32::MAX, which plan validation rejects.
        let tiles_u32 = contiguous(tiles.as_slice(), "plan tiles")?
            .iter()
            .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
            .collect();
        let codes = contiguous(transforms.as_slice(), "plan transforms")?.to_vec();
        Ok(KernelPlan {
            grid,
            tiles: tiles_u32,
            codes,
        })
    }

    /// `grid_plan(n, rows, cols, square_tiles, seed, offset, derange, flips)`
    /// -> `(tiles int64 (n, rows, cols), transforms uint8 (n, rows, cols))`.
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn grid_plan<'py>(
        py: Python<'py>,
        n: usize,
        rows: usize,
        cols: usize,
        square_tiles: bool,
        seed: u64,
        offset: u64,
        derange: bool,
        flips: bool,
    ) -> PyResult<PlanArrays<'py>> {
        let spec = PlanSpec {
            rows,
            cols,
            square_tiles,
            derange,
            flips,
        };
        let (tiles, codes) = run_detached(py, || {
            let (tiles, codes) = perm::batch_plan(&spec, n, seed, offset)?;
            let mut wide = perm::zeroed_vec::<i64>(tiles.len())?;
            wide.iter_mut()
                .zip(tiles)
                .for_each(|(w, t)| *w = i64::from(t));
            Ok((wide, codes))
        })?;
        let tiles = PyArray1::from_vec(py, tiles).reshape([n, rows, cols])?;
        let codes = PyArray1::from_vec(py, codes).reshape([n, rows, cols])?;
        Ok((tiles, codes))
    }

    fn scramble_into<T: numpy::Element + Copy + Send + Sync>(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, T>,
        mut out: PyReadwriteArrayDyn<'_, T>,
        channels_last: bool,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        let shape = shape4(src.shape(), "input")?;
        if out.shape() != src.shape() {
            return Err(PyValueError::new_err(format!(
                "output shape {:?} differs from input shape {:?}",
                out.shape(),
                src.shape()
            )));
        }
        let (layout, dims) = if channels_last {
            let [n, h, w, c] = shape;
            (Layout::Nhwc, Dims { n, c, h, w })
        } else {
            let [n, c, h, w] = shape;
            (Layout::Nchw, Dims { n, c, h, w })
        };
        let plan = plan_from_arrays(&tiles, &transforms)?;
        let src = contiguous(src.as_slice(), "input")?;
        let out = out
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("output must be a C-contiguous array"))?;
        run_detached(py, || {
            grid::scramble(src, out, dims, layout, plan.grid, &plan.tiles, &plan.codes)
        })
    }

    /// `scramble_<bits>(src, out, channels_last, tiles, transforms)`: write
    /// the scrambled 4-D `src` into `out` (same shape, C-contiguous).
    #[pyfunction]
    fn scramble_u8(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u8>,
        out: PyReadwriteArrayDyn<'_, u8>,
        channels_last: bool,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        scramble_into(py, src, out, channels_last, tiles, transforms)
    }

    #[pyfunction]
    fn scramble_u16(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u16>,
        out: PyReadwriteArrayDyn<'_, u16>,
        channels_last: bool,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        scramble_into(py, src, out, channels_last, tiles, transforms)
    }

    #[pyfunction]
    fn scramble_u32(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u32>,
        out: PyReadwriteArrayDyn<'_, u32>,
        channels_last: bool,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        scramble_into(py, src, out, channels_last, tiles, transforms)
    }

    fn prepare_into<O: numpy::Element + Copy + Send + Sync>(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u8>,
        mut out: PyReadwriteArrayDyn<'_, O>,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
        lut: &[O; 256],
    ) -> PyResult<()> {
        let [n, h, w, c] = shape4(src.shape(), "input")?;
        if out.shape() != [n, c, h, w] {
            return Err(PyValueError::new_err(format!(
                "output shape {:?} is not the NCHW shape {:?} of the NHWC input",
                out.shape(),
                [n, c, h, w]
            )));
        }
        let plan = plan_from_arrays(&tiles, &transforms)?;
        let src = contiguous(src.as_slice(), "input")?;
        let out = out
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("output must be a C-contiguous array"))?;
        run_detached(py, || {
            grid::prepare(
                src,
                out,
                Dims { n, c, h, w },
                plan.grid,
                &plan.tiles,
                &plan.codes,
                lut,
            )
        })
    }

    /// `prepare_f32(src_u8_nhwc, out_f32_nchw, tiles, transforms)`: fused
    /// scramble + `x * 2 / 255 - 1`.
    #[pyfunction]
    fn prepare_f32(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u8>,
        out: PyReadwriteArrayDyn<'_, f32>,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        prepare_into(py, src, out, tiles, transforms, &grid::unit_range_f32_lut())
    }

    /// Like `prepare_f32`, writing float16 bits into a uint16 array.
    #[pyfunction]
    fn prepare_f16(
        py: Python<'_>,
        src: PyReadonlyArrayDyn<'_, u8>,
        out: PyReadwriteArrayDyn<'_, u16>,
        tiles: PyReadonlyArray3<'_, i64>,
        transforms: PyReadonlyArray3<'_, u8>,
    ) -> PyResult<()> {
        prepare_into(py, src, out, tiles, transforms, &grid::unit_range_f16_lut())
    }

    #[pymodule]
    fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(grid_plan, m)?)?;
        m.add_function(wrap_pyfunction!(scramble_u8, m)?)?;
        m.add_function(wrap_pyfunction!(scramble_u16, m)?)?;
        m.add_function(wrap_pyfunction!(scramble_u32, m)?)?;
        m.add_function(wrap_pyfunction!(prepare_f32, m)?)?;
        m.add_function(wrap_pyfunction!(prepare_f16, m)?)?;
        Ok(())
    }
}
