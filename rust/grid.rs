//! Scrambled-Grid kernels: move tiles of an image batch according to a plan.
//!
//! Output tile `p` (row-major) shows source tile `tiles[p]`, transformed by
//! `transforms[p]` (see `perm::{HFLIP, VFLIP, TRANSPOSE}`). Work is split with
//! rayon over output tile rows ("bands": `tile_h` rows of one plane), so
//! every output element is written exactly once, by one task, and results do
//! not depend on the thread count.

use rayon::prelude::*;

use crate::GridError;
use crate::perm::{HFLIP, PlanSpec, TRANSPOSE, VFLIP, validate_plan};

/// Memory order of an image batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// (batch, channels, height, width)
    Nchw,
    /// (batch, height, width, channels)
    Nhwc,
}

/// Logical sizes of an image batch, whatever its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Dims {
    pub fn element_count(&self) -> Option<usize> {
        self.n
            .checked_mul(self.c)?
            .checked_mul(self.h)?
            .checked_mul(self.w)
    }
}

/// Tile height and width for an `h x w` image cut into `rows x cols`.
pub fn tile_shape(
    h: usize,
    w: usize,
    rows: usize,
    cols: usize,
) -> Result<(usize, usize), GridError> {
    if rows == 0 || cols == 0 {
        return Err(GridError::new(format!(
            "grid must be at least 1x1, got {rows}x{cols}"
        )));
    }
    if rows > h || cols > w {
        return Err(GridError::new(format!(
            "grid {rows}x{cols} is larger than the {h}x{w} image"
        )));
    }
    if !h.is_multiple_of(rows) || !w.is_multiple_of(cols) {
        return Err(GridError::new(format!(
            "image height x width {h}x{w} is not divisible by the grid {rows}x{cols}"
        )));
    }
    Ok((h / rows, w / cols))
}

/// Where output rows find their source pixels. A "pixel" is `px` adjacent
/// elements: 1 for planar (NCHW) data, C for interleaved (NHWC) data.
#[derive(Clone, Copy, Debug)]
struct TileMap {
    w: usize,
    px: usize,
    tile_h: usize,
    tile_w: usize,
    cols: usize,
}

impl TileMap {
    /// Element offset, within its plane, of the source pixel that lands at
    /// `(iy, j)` of an output tile showing source tile `src_tile` with `code`.
    #[inline(always)]
    fn source_offset(&self, src_tile: usize, code: u8, iy: usize, j: usize) -> usize {
        // Undo the transform: transpose is applied last, so it is undone first.
        let (a, b) = if code & TRANSPOSE != 0 {
            (j, iy)
        } else {
            (iy, j)
        };
        let a = if code & VFLIP != 0 {
            self.tile_h - 1 - a
        } else {
            a
        };
        let b = if code & HFLIP != 0 {
            self.tile_w - 1 - b
        } else {
            b
        };
        let y = (src_tile / self.cols) * self.tile_h + a;
        let x = (src_tile % self.cols) * self.tile_w + b;
        (y * self.w + x) * self.px
    }

    /// Fill one output tile row (`tile_h` rows of one plane) from `plane`.
    ///
    /// Rows go in blocks of about `BLOCK_BYTES` of output; within a block,
    /// tile by tile, top to bottom. Reads then walk each source tile with a
    /// constant stride for several rows (prefetch-friendly) while the block
    /// being written stays in L1. Plain row-major order hops between `cols`
    /// source tiles on every row and measured about 2x slower.
    fn scramble_band<T: Copy>(
        &self,
        plane: &[T],
        ty: usize,
        band: &mut [T],
        tiles: &[u32],
        codes: &[u8],
    ) {
        const BLOCK_BYTES: usize = 16 * 1024;
        let row_len = self.w * self.px;
        let segment = self.tile_w * self.px;
        let block_rows = (BLOCK_BYTES / (row_len * std::mem::size_of::<T>()).max(1)).max(1);
        for first_row in (0..self.tile_h).step_by(block_rows) {
            let block = first_row..(first_row + block_rows).min(self.tile_h);
            for tx in 0..self.cols {
                let (src_tile, code) = (
                    tiles[ty * self.cols + tx] as usize,
                    codes[ty * self.cols + tx],
                );
                for iy in block.clone() {
                    let dst = &mut band[iy * row_len + tx * segment..][..segment];
                    self.copy_tile_row(plane, src_tile, code, iy, dst);
                }
            }
        }
    }

    /// Row `iy` of an output tile showing `src_tile` transformed by `code`.
    #[inline(always)]
    fn copy_tile_row<T: Copy>(
        &self,
        plane: &[T],
        src_tile: usize,
        code: u8,
        iy: usize,
        dst: &mut [T],
    ) {
        let px = self.px;
        if code & (TRANSPOSE | HFLIP) == 0 {
            // Fast path: one contiguous source row segment.
            let start = self.source_offset(src_tile, code, iy, 0);
            dst.copy_from_slice(&plane[start..start + dst.len()]);
        } else if px == 1 {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = plane[self.source_offset(src_tile, code, iy, j)];
            }
        } else {
            for (j, d) in dst.chunks_exact_mut(px).enumerate() {
                let start = self.source_offset(src_tile, code, iy, j);
                d.copy_from_slice(&plane[start..start + px]);
            }
        }
    }
}

/// Shared checks: sizes, grid, plan. Returns the tile map for `px`.
fn check_inputs(
    dims: Dims,
    src_len: usize,
    out_len: usize,
    grid: (usize, usize),
    tiles: &[u32],
    transforms: &[u8],
    px: usize,
) -> Result<TileMap, GridError> {
    let (rows, cols) = grid;
    let Dims { n, c, h, w } = dims;
    if n == 0 {
        return Err(GridError::new("empty batch: no images to scramble"));
    }
    if c == 0 {
        return Err(GridError::new("images have 0 channels"));
    }
    let (tile_h, tile_w) = tile_shape(h, w, rows, cols)?;
    let expected = dims
        .element_count()
        .ok_or_else(|| GridError::new("image batch is too large"))?;
    if src_len != expected || out_len != expected {
        return Err(GridError::new(format!(
            "input has {src_len} and output {out_len} elements, expected {n}x{c}x{h}x{w} = {expected}"
        )));
    }
    let spec = PlanSpec {
        rows,
        cols,
        square_tiles: tile_h == tile_w,
        derange: false,
        flips: true,
    };
    validate_plan(&spec, n, tiles, transforms)?;
    Ok(TileMap {
        w,
        px,
        tile_h,
        tile_w,
        cols,
    })
}

/// Scramble a batch, bit-exact: `out` gets `src`'s tiles moved as planned.
/// Generic over the element type; callers pass 16-bit floats as `u16` etc.
pub fn scramble<T: Copy + Send + Sync>(
    src: &[T],
    out: &mut [T],
    dims: Dims,
    layout: Layout,
    grid: (usize, usize),
    tiles: &[u32],
    transforms: &[u8],
) -> Result<(), GridError> {
    let px = match layout {
        Layout::Nchw => 1,
        Layout::Nhwc => dims.c,
    };
    let map = check_inputs(dims, src.len(), out.len(), grid, tiles, transforms, px)?;
    // A plane: one channel (NCHW) or one whole interleaved image (NHWC).
    let planes_per_image = match layout {
        Layout::Nchw => dims.c,
        Layout::Nhwc => 1,
    };
    let band_len = map.tile_h * dims.w * px;
    let plane_len = dims.h * dims.w * px;
    let per_image = grid.0 * grid.1;
    out.par_chunks_mut(band_len)
        .enumerate()
        .for_each(|(b, band)| {
            let (plane_index, ty) = (b / grid.0, b % grid.0);
            let image = plane_index / planes_per_image;
            let plane = &src[plane_index * plane_len..][..plane_len];
            let tiles = &tiles[image * per_image..][..per_image];
            let codes = &transforms[image * per_image..][..per_image];
            map.scramble_band(plane, ty, band, tiles, codes);
        });
    Ok(())
}

/// Lookup table mapping a byte `v` to `v * 2 / 255 - 1`, computed in f64 and
/// rounded once to f32: the correctly rounded value in [-1, 1].
pub fn unit_range_f32_lut() -> [f32; 256] {
    std::array::from_fn(|v| (v as f64 * 2.0 / 255.0 - 1.0) as f32)
}

/// The same values as IEEE half-precision bits (rounded from the f32 table).
pub fn unit_range_f16_lut() -> [u16; 256] {
    let f32_lut = unit_range_f32_lut();
    std::array::from_fn(|v| half::f16::from_f32(f32_lut[v]).to_bits())
}

/// Fused data prep: uint8 NHWC images -> scrambled planar (NCHW) values via
/// `lut`, in one pass over memory. Each task takes one tile row of an image:
/// it scrambles the source bytes into a small scratch band (tile by tile, the
/// prefetch-friendly read order; the band stays in L2), then de-interleaves
/// the band through `lut` into the channel planes with purely sequential
/// writes, which dominate the traffic (4 or 2 output bytes per input byte).
pub fn prepare<O: Copy + Send + Sync>(
    src: &[u8],
    out: &mut [O],
    dims: Dims,
    grid: (usize, usize),
    tiles: &[u32],
    transforms: &[u8],
    lut: &[O; 256],
) -> Result<(), GridError> {
    let map = check_inputs(dims, src.len(), out.len(), grid, tiles, transforms, dims.c)?;
    let Dims { c, h, w, .. } = dims;
    let image_len = c * h * w;
    let per_image = grid.0 * grid.1;
    out.par_chunks_mut(image_len)
        .zip(src.par_chunks(image_len))
        .zip(
            tiles
                .par_chunks(per_image)
                .zip(transforms.par_chunks(per_image)),
        )
        .for_each(|((out_image, src_image), (tiles, codes))| {
            // bands[ty][ch]: output tile row `ty` of channel `ch`.
            let mut bands: Vec<Vec<&mut [O]>> =
                (0..grid.0).map(|_| Vec::with_capacity(c)).collect();
            for plane in out_image.chunks_exact_mut(h * w) {
                for (ty, band) in plane.chunks_exact_mut(map.tile_h * w).enumerate() {
                    bands[ty].push(band);
                }
            }
            bands
                .into_par_iter()
                .enumerate()
                .for_each(|(ty, mut channel_bands)| {
                    let mut scrambled = vec![0u8; map.tile_h * w * c];
                    map.scramble_band(src_image, ty, &mut scrambled, tiles, codes);
                    deinterleave(&scrambled, &mut channel_bands, lut);
                });
        });
    Ok(())
}

/// Interleaved `C`-channel bytes -> `C` planes of the same pixel count,
/// through `lut`.
fn deinterleave<O: Copy>(interleaved: &[u8], planes: &mut [&mut [O]], lut: &[O; 256]) {
    match planes {
        [a] => convert_pixels::<O, 1>(interleaved, [a], lut),
        [a, b, c] => convert_pixels::<O, 3>(interleaved, [a, b, c], lut),
        [a, b, c, d] => convert_pixels::<O, 4>(interleaved, [a, b, c, d], lut),
        planes => {
            let c = planes.len();
            for (ch, plane) in planes.iter_mut().enumerate() {
                for (d, &v) in plane.iter_mut().zip(interleaved[ch..].iter().step_by(c)) {
                    *d = lut[v as usize];
                }
            }
        }
    }
}

/// `deinterleave` for a compile-time channel count, so the loop runs
/// without bounds checks.
#[inline(always)]
fn convert_pixels<O: Copy, const C: usize>(src: &[u8], dst: [&mut [O]; C], lut: &[O; 256]) {
    let pixels = src.len() / C;
    // Equal-length slices let the compiler drop the per-element bounds checks.
    let dst = dst.map(|plane| &mut plane[..pixels]);
    for (j, pixel) in src.chunks_exact(C).enumerate() {
        for ch in 0..C {
            dst[ch][j] = lut[pixel[ch] as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perm::batch_plan;

    /// Straightforward per-element reference, independent of the row kernel.
    fn reference(
        src: &[u32],
        dims: Dims,
        layout: Layout,
        grid: (usize, usize),
        tiles: &[u32],
        codes: &[u8],
    ) -> Vec<u32> {
        let Dims { n, c, h, w } = dims;
        let (th, tw) = (h / grid.0, w / grid.1);
        let index = |n_: usize, c_: usize, y: usize, x: usize| match layout {
            Layout::Nchw => ((n_ * c + c_) * h + y) * w + x,
            Layout::Nhwc => ((n_ * h + y) * w + x) * c + c_,
        };
        let mut out = vec![0; src.len()];
        for n_ in 0..n {
            for p in 0..grid.0 * grid.1 {
                let (s, code) = (
                    tiles[n_ * grid.0 * grid.1 + p] as usize,
                    codes[n_ * grid.0 * grid.1 + p],
                );
                // Build the transformed source tile the way the torch reference does.
                let mut tile: Vec<Vec<(usize, usize)>> = (0..th)
                    .map(|i| {
                        (0..tw)
                            .map(|j| ((s / grid.1) * th + i, (s % grid.1) * tw + j))
                            .collect()
                    })
                    .collect();
                if code & VFLIP != 0 {
                    tile.reverse();
                }
                if code & HFLIP != 0 {
                    tile.iter_mut().for_each(|r| r.reverse());
                }
                if code & TRANSPOSE != 0 {
                    tile = (0..tw)
                        .map(|i| (0..th).map(|j| tile[j][i]).collect())
                        .collect();
                }
                for (i, row) in tile.iter().enumerate() {
                    for (j, &(sy, sx)) in row.iter().enumerate() {
                        let (oy, ox) = ((p / grid.1) * th + i, (p % grid.1) * tw + j);
                        for c_ in 0..c {
                            out[index(n_, c_, oy, ox)] = src[index(n_, c_, sy, sx)];
                        }
                    }
                }
            }
        }
        out
    }

    fn iota(len: usize) -> Vec<u32> {
        (0..len as u32).collect()
    }

    #[test]
    fn matches_reference_for_all_layouts_and_flips() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for (dims, grid) in [
                (
                    Dims {
                        n: 3,
                        c: 2,
                        h: 8,
                        w: 8,
                    },
                    (4, 4),
                ),
                (
                    Dims {
                        n: 2,
                        c: 3,
                        h: 6,
                        w: 12,
                    },
                    (3, 4),
                ),
                (
                    Dims {
                        n: 1,
                        c: 1,
                        h: 4,
                        w: 6,
                    },
                    (2, 3),
                ),
                (
                    Dims {
                        n: 2,
                        c: 4,
                        h: 9,
                        w: 4,
                    },
                    (3, 2),
                ),
            ] {
                let (th, tw) = tile_shape(dims.h, dims.w, grid.0, grid.1).unwrap();
                let spec = PlanSpec {
                    rows: grid.0,
                    cols: grid.1,
                    square_tiles: th == tw,
                    derange: true,
                    flips: true,
                };
                let (tiles, codes) = batch_plan(&spec, dims.n, 5, 0).unwrap();
                let src = iota(dims.element_count().unwrap());
                let mut out = vec![0; src.len()];
                scramble(&src, &mut out, dims, layout, grid, &tiles, &codes).unwrap();
                assert_eq!(
                    out,
                    reference(&src, dims, layout, grid, &tiles, &codes),
                    "{layout:?} {dims:?}"
                );
            }
        }
    }

    #[test]
    fn wide_rows_split_into_several_blocks_match_reference() {
        // 2048 u32 = 8 KiB per row: 2-row blocks inside 4-row tiles (NCHW);
        // NHWC rows of 3 channels exceed a block alone.
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let dims = Dims {
                n: 2,
                c: 3,
                h: 8,
                w: 2048,
            };
            let grid = (2, 4);
            let spec = PlanSpec {
                rows: 2,
                cols: 4,
                square_tiles: false,
                derange: true,
                flips: true,
            };
            let (tiles, codes) = batch_plan(&spec, dims.n, 3, 0).unwrap();
            let src = iota(dims.element_count().unwrap());
            let mut out = vec![0; src.len()];
            scramble(&src, &mut out, dims, layout, grid, &tiles, &codes).unwrap();
            assert_eq!(
                out,
                reference(&src, dims, layout, grid, &tiles, &codes),
                "{layout:?}"
            );
        }
    }

    #[test]
    fn every_transform_code_matches_reference() {
        let dims = Dims {
            n: 1,
            c: 2,
            h: 6,
            w: 6,
        };
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for code in 0..8u8 {
                let tiles = [3, 0, 2, 1];
                let codes = [code; 4];
                let src = iota(dims.element_count().unwrap());
                let mut out = vec![0; src.len()];
                scramble(&src, &mut out, dims, layout, (2, 2), &tiles, &codes).unwrap();
                assert_eq!(
                    out,
                    reference(&src, dims, layout, (2, 2), &tiles, &codes),
                    "code {code}"
                );
            }
        }
    }

    #[test]
    fn transpose_of_a_tile_is_explicit() {
        // 1 image, 1 channel, 2x2 grid of 2x2 tiles, identity order, tile 0 transposed.
        let src: Vec<u8> = vec![
            1, 2, 10, 11, //
            3, 4, 12, 13, //
            20, 21, 30, 31, //
            22, 23, 32, 33,
        ];
        let mut out = vec![0u8; 16];
        let dims = Dims {
            n: 1,
            c: 1,
            h: 4,
            w: 4,
        };
        scramble(
            &src,
            &mut out,
            dims,
            Layout::Nchw,
            (2, 2),
            &[0, 1, 2, 3],
            &[TRANSPOSE, 0, 0, 0],
        )
        .unwrap();
        assert_eq!(&out[..4], &[1, 3, 10, 11]);
        assert_eq!(&out[4..8], &[2, 4, 12, 13]);
        // Vertical then horizontal flip of tile 3 = 180 degree rotation.
        scramble(
            &src,
            &mut out,
            dims,
            Layout::Nchw,
            (2, 2),
            &[0, 1, 2, 3],
            &[0, 0, 0, VFLIP | HFLIP],
        )
        .unwrap();
        assert_eq!(&out[10..12], &[33, 32]);
        assert_eq!(&out[14..16], &[31, 30]);
    }

    #[test]
    fn grid_one_is_identity() {
        let dims = Dims {
            n: 2,
            c: 3,
            h: 5,
            w: 7,
        };
        let src: Vec<u16> = (0..dims.element_count().unwrap() as u16).collect();
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let mut out = vec![0u16; src.len()];
            scramble(&src, &mut out, dims, layout, (1, 1), &[0, 0], &[0, 0]).unwrap();
            assert_eq!(out, src);
        }
    }

    #[test]
    fn output_is_a_permutation_of_tiles() {
        let dims = Dims {
            n: 4,
            c: 1,
            h: 8,
            w: 8,
        };
        let spec = PlanSpec {
            rows: 2,
            cols: 2,
            square_tiles: true,
            derange: true,
            flips: false,
        };
        let (tiles, codes) = batch_plan(&spec, 4, 11, 0).unwrap();
        let src = iota(dims.element_count().unwrap());
        let mut out = vec![0; src.len()];
        scramble(&src, &mut out, dims, Layout::Nchw, (2, 2), &tiles, &codes).unwrap();
        assert_ne!(out, src);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, src);
        // Each 4x4 output block is exactly one source block.
        for img in 0..4 {
            for p in 0..4 {
                let s = tiles[img * 4 + p] as usize;
                for i in 0..4 {
                    let o = img * 64 + ((p / 2) * 4 + i) * 8 + (p % 2) * 4;
                    let q = img * 64 + ((s / 2) * 4 + i) * 8 + (s % 2) * 4;
                    assert_eq!(out[o..o + 4], src[q..q + 4]);
                }
            }
        }
    }

    #[test]
    fn prepare_matches_scramble_then_lut() {
        let dims = Dims {
            n: 2,
            c: 3,
            h: 8,
            w: 12,
        };
        let grid = (2, 3);
        let spec = PlanSpec {
            rows: 2,
            cols: 3,
            square_tiles: true,
            derange: true,
            flips: true,
        };
        let (tiles, codes) = batch_plan(&spec, dims.n, 1, 0).unwrap();
        let src: Vec<u8> = (0..dims.element_count().unwrap())
            .map(|i| (i * 37 % 256) as u8)
            .collect();
        let lut = unit_range_f32_lut();
        let mut fused = vec![0f32; src.len()];
        prepare(&src, &mut fused, dims, grid, &tiles, &codes, &lut).unwrap();

        // Unfused: scramble NHWC bytes, then convert and transpose to NCHW.
        let mut scrambled = vec![0u8; src.len()];
        scramble(
            &src,
            &mut scrambled,
            dims,
            Layout::Nhwc,
            grid,
            &tiles,
            &codes,
        )
        .unwrap();
        let Dims { n, c, h, w } = dims;
        for n_ in 0..n {
            for c_ in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let v = scrambled[((n_ * h + y) * w + x) * c + c_];
                        assert_eq!(fused[((n_ * c + c_) * h + y) * w + x], lut[v as usize]);
                    }
                }
            }
        }
    }

    #[test]
    fn lut_endpoints_and_half_bits() {
        let lut = unit_range_f32_lut();
        assert_eq!(lut[0], -1.0);
        assert_eq!(lut[255], 1.0);
        assert!(lut.windows(2).all(|p| p[0] < p[1]));
        let h = unit_range_f16_lut();
        assert_eq!(h[0], 0xBC00); // -1.0
        assert_eq!(h[255], 0x3C00); // 1.0
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dims = Dims {
            n: 1,
            c: 1,
            h: 4,
            w: 4,
        };
        let src = vec![0u8; 16];
        let mut out = vec![0u8; 16];
        let ident = [0u32, 1, 2, 3];
        let zeros = [0u8; 4];
        let err = |r: Result<(), GridError>| r.unwrap_err().to_string();
        assert!(
            err(scramble(
                &src,
                &mut out,
                dims,
                Layout::Nchw,
                (3, 3),
                &[0; 9],
                &[0; 9]
            ))
            .contains("not divisible")
        );
        assert!(
            err(scramble(
                &src,
                &mut out,
                dims,
                Layout::Nchw,
                (8, 1),
                &[0; 8],
                &[0; 8]
            ))
            .contains("larger")
        );
        assert!(
            err(scramble(
                &src,
                &mut out,
                dims,
                Layout::Nchw,
                (0, 2),
                &[],
                &[]
            ))
            .contains("at least 1x1")
        );
        assert!(
            err(scramble(
                &src[..15],
                &mut out,
                dims,
                Layout::Nchw,
                (2, 2),
                &ident,
                &zeros
            ))
            .contains("elements")
        );
        assert!(
            err(scramble(
                &src,
                &mut out,
                Dims { n: 0, ..dims },
                Layout::Nchw,
                (2, 2),
                &[],
                &[]
            ))
            .contains("empty")
        );
        assert!(
            err(scramble(
                &src,
                &mut out,
                dims,
                Layout::Nchw,
                (2, 2),
                &[0, 0, 1, 2],
                &zeros
            ))
            .contains("permutation")
        );
        assert!(
            err(scramble(
                &src,
                &mut out,
                dims,
                Layout::Nchw,
                (2, 2),
                &ident[..3],
                &zeros[..3]
            ))
            .contains("plan")
        );
        let oblong = Dims {
            n: 1,
            c: 1,
            h: 4,
            w: 8,
        };
        let (src8, mut out8) = (vec![0u8; 32], vec![0u8; 32]);
        assert!(
            err(scramble(
                &src8,
                &mut out8,
                oblong,
                Layout::Nchw,
                (2, 2),
                &ident,
                &[4, 0, 0, 0]
            ))
            .contains("non-square")
        );
        let lut = unit_range_f32_lut();
        let mut fout = vec![0f32; 16];
        assert!(prepare(&src, &mut fout, dims, (3, 3), &[0; 9], &[0; 9], &lut).is_err());
    }
}
