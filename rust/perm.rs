//! Seeded Scrambled-Grid plans: which source tile lands at each output tile,
//! and which flip/transpose it gets on the way.
//!
//! Every image has its own ChaCha8 stream, keyed by `(seed, offset + i)`, so a
//! plan depends only on the seed and the image's index in the whole run: not
//! on thread count, nor on how a run is split into calls.
//!
//! Random draws use only `next_u64` plus the bounded sampler below (not
//! `rand`'s distributions), so a seed gives the same plan whatever `rand`
//! version is around.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::GridError;

/// Transform bits, applied to the source tile in this order: vertical flip
/// (rows axis), horizontal flip (cols axis), transpose.
pub const HFLIP: u8 = 0b001;
pub const VFLIP: u8 = 0b010;
pub const TRANSPOSE: u8 = 0b100;

/// How to draw plans for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSpec {
    pub rows: usize,
    pub cols: usize,
    /// Transposes keep a tile's shape only when it is square.
    pub square_tiles: bool,
    /// No tile stays in place. A 1x1 grid cannot be deranged: `validate`
    /// refuses it rather than return the identity as if it were scrambled.
    pub derange: bool,
    /// Draw a transform code per output tile (grids of more than one tile);
    /// otherwise all codes are 0.
    pub flips: bool,
}

impl PlanSpec {
    pub fn tiles_per_image(&self) -> usize {
        self.rows * self.cols
    }

    /// Number of distinct transform codes that may be drawn (1, 4 or 8).
    /// A 1x1 grid is always the identity, so it gets no transforms either.
    pub fn transform_kinds(&self) -> u8 {
        match (self.flips && self.tiles_per_image() > 1, self.square_tiles) {
            (false, _) => 1,
            (true, false) => 4,
            (true, true) => 8,
        }
    }

    fn validate(&self) -> Result<(), GridError> {
        if self.rows == 0 || self.cols == 0 {
            return Err(GridError::new(format!(
                "grid must be at least 1x1, got {}x{}",
                self.rows, self.cols
            )));
        }
        self.rows
            .checked_mul(self.cols)
            .filter(|&t| t <= u32::MAX as usize)
            .ok_or_else(|| {
                GridError::new(format!(
                    "grid {}x{} has too many tiles",
                    self.rows, self.cols
                ))
            })?;
        if self.derange && self.tiles_per_image() == 1 {
            return Err(GridError::new(
                "grid 1x1 has a single tile, which cannot be moved: a derangement needs at least 2 tiles",
            ));
        }
        Ok(())
    }
}

/// Uniform integer in `0..n` (n >= 1), without modulo bias (Lemire 2019).
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n; // (2^64 - n) mod n
    loop {
        let wide = (rng.next_u64() as u128) * (n as u128);
        if (wide as u64) >= threshold {
            return (wide >> 64) as u64;
        }
    }
}

/// The RNG for image `stream` of the run seeded with `seed`.
pub fn image_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Fill one image's plan. `tiles[p]` is the source tile shown at output
/// position `p` (row-major); `transforms[p]` its transform code.
fn fill_image_plan(
    spec: &PlanSpec,
    rng: &mut ChaCha8Rng,
    tiles: &mut [u32],
    transforms: &mut [u8],
) {
    let n = tiles.len();
    loop {
        for (p, t) in tiles.iter_mut().enumerate() {
            *t = p as u32;
        }
        // Fisher-Yates.
        for i in (1..n).rev() {
            let j = below(rng, i as u64 + 1) as usize;
            tiles.swap(i, j);
        }
        // Rejection sampling keeps derangements uniform; about e tries on average
        // (`validate` has refused the single tile, for which it would never end).
        let has_fixed_point = tiles.iter().enumerate().any(|(p, &t)| t as usize == p);
        if !(spec.derange && has_fixed_point) {
            break;
        }
    }
    let kinds = spec.transform_kinds();
    for code in transforms.iter_mut() {
        // `kinds` is a power of two, so masking is unbiased.
        *code = if kinds > 1 {
            (rng.next_u64() as u8) & (kinds - 1)
        } else {
            0
        };
    }
}

/// Most tiles (images x tiles per image) one `batch_plan` call returns: about
/// 3.5 GB with the int64 copy Python gets. Larger requests are errors, not
/// allocations that abort the process; split them with `offset`.
pub const MAX_PLAN_TILES: usize = 1 << 28;

/// `len` zeros, or an error if the memory cannot be had (instead of the
/// allocation-failure abort of `vec![0; len]`).
pub fn zeroed_vec<T: Copy + Default>(len: usize) -> Result<Vec<T>, GridError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        GridError::out_of_memory(format!(
            "cannot allocate {len} x {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    v.resize(len, T::default());
    Ok(v)
}

/// Plans for `n` images whose first one has index `offset` in the run.
/// Returns `(tiles, transforms)`, each `n * rows * cols` long, image-major.
pub fn batch_plan(
    spec: &PlanSpec,
    n: usize,
    seed: u64,
    offset: u64,
) -> Result<(Vec<u32>, Vec<u8>), GridError> {
    spec.validate()?;
    let per_image = spec.tiles_per_image();
    if n > 0 && offset.checked_add(n as u64 - 1).is_none() {
        return Err(GridError::new(format!(
            "offset {offset} + batch of {n} overflows the 64-bit stream index"
        )));
    }
    let total = n
        .checked_mul(per_image)
        .filter(|&total| total <= MAX_PLAN_TILES)
        .ok_or_else(|| {
            GridError::new(format!(
                "a plan for {n} images x {per_image} tiles exceeds the limit of {MAX_PLAN_TILES} \
                 tiles per call; plan in smaller batches with `offset` (the plans are identical)"
            ))
        })?;
    let mut tiles = zeroed_vec::<u32>(total)?;
    let mut transforms = zeroed_vec::<u8>(total)?;
    if total > 0 {
        tiles
            .par_chunks_mut(per_image)
            .zip(transforms.par_chunks_mut(per_image))
            .enumerate()
            .for_each(|(i, (tiles, transforms))| {
                let mut rng = image_rng(seed, offset + i as u64);
                fill_image_plan(spec, &mut rng, tiles, transforms);
            });
    }
    Ok((tiles, transforms))
}

/// Check that a plan given from outside is usable: every image's tiles are a
/// permutation of `0..rows*cols` and every code is allowed for the tile shape.
pub fn validate_plan(
    spec: &PlanSpec,
    n: usize,
    tiles: &[u32],
    transforms: &[u8],
) -> Result<(), GridError> {
    spec.validate()?;
    let per_image = spec.tiles_per_image();
    if tiles.len() != n * per_image || transforms.len() != n * per_image {
        return Err(GridError::new(format!(
            "plan has {} tiles and {} transforms, expected {} images x {}x{} = {}",
            tiles.len(),
            transforms.len(),
            n,
            spec.rows,
            spec.cols,
            n * per_image
        )));
    }
    let max_code = if spec.square_tiles { 7 } else { 3 };
    let mut seen = vec![false; per_image];
    for (i, (tiles, transforms)) in tiles
        .chunks(per_image)
        .zip(transforms.chunks(per_image))
        .enumerate()
    {
        seen.fill(false);
        for &t in tiles {
            let t = t as usize;
            if t >= per_image || std::mem::replace(&mut seen[t], true) {
                return Err(GridError::new(format!(
                    "plan for image {i} is not a permutation of 0..{per_image}"
                )));
            }
        }
        if let Some(&code) = transforms.iter().find(|&&c| c > max_code) {
            return Err(GridError::new(format!(
                "plan for image {i} has transform code {code}; at most {max_code} allowed for {} tiles",
                if spec.square_tiles {
                    "square"
                } else {
                    "non-square"
                }
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rows: usize, cols: usize, derange: bool, flips: bool) -> PlanSpec {
        PlanSpec {
            rows,
            cols,
            square_tiles: true,
            derange,
            flips,
        }
    }

    fn is_permutation(tiles: &[u32]) -> bool {
        let mut sorted = tiles.to_vec();
        sorted.sort_unstable();
        sorted.iter().enumerate().all(|(i, &t)| t as usize == i)
    }

    #[test]
    fn same_seed_same_plan_and_seed_matters() {
        let s = spec(4, 4, true, true);
        let a = batch_plan(&s, 5, 7, 0).unwrap();
        let b = batch_plan(&s, 5, 7, 0).unwrap();
        let c = batch_plan(&s, 5, 8, 0).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn every_image_gets_a_valid_permutation() {
        for (rows, cols) in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4), (8, 8), (3, 7)] {
            let s = spec(rows, cols, false, false);
            let (tiles, transforms) = batch_plan(&s, 20, 1, 0).unwrap();
            for img in tiles.chunks(rows * cols) {
                assert!(is_permutation(img));
            }
            assert!(transforms.iter().all(|&t| t == 0));
            validate_plan(&s, 20, &tiles, &transforms).unwrap();
        }
    }

    #[test]
    fn derangement_moves_every_tile() {
        for (rows, cols) in [(1, 2), (2, 1), (2, 2), (3, 3), (8, 8)] {
            let (tiles, _) = batch_plan(&spec(rows, cols, true, false), 200, 3, 0).unwrap();
            for img in tiles.chunks(rows * cols) {
                assert!(is_permutation(img));
                assert!(
                    img.iter().enumerate().all(|(p, &t)| t as usize != p),
                    "{img:?}"
                );
            }
        }
    }

    #[test]
    fn without_derange_fixed_points_occur() {
        let (tiles, _) = batch_plan(&spec(2, 2, false, false), 200, 3, 0).unwrap();
        let any_fixed = tiles
            .chunks(4)
            .any(|img| img.iter().enumerate().any(|(p, &t)| t as usize == p));
        assert!(any_fixed);
    }

    #[test]
    fn single_tile_without_derange_is_identity() {
        let (tiles, transforms) = batch_plan(&spec(1, 1, false, true), 10, 0, 0).unwrap();
        assert!(tiles.iter().all(|&t| t == 0));
        assert!(transforms.iter().all(|&t| t == 0));
    }

    #[test]
    fn single_tile_cannot_be_deranged() {
        for flips in [false, true] {
            let err = batch_plan(&spec(1, 1, true, flips), 10, 0, 0).unwrap_err();
            assert!(err.to_string().contains("single tile"), "{err}");
            assert!(!err.is_out_of_memory());
            // Also for an empty batch: the grid is wrong whatever the images.
            assert!(batch_plan(&spec(1, 1, true, flips), 0, 0, 0).is_err());
        }
        // Two tiles are enough: the only derangement swaps them.
        let (tiles, _) = batch_plan(&spec(1, 2, true, false), 5, 0, 0).unwrap();
        assert!(tiles.chunks(2).all(|img| img == [1, 0]));
    }

    #[test]
    fn split_batch_with_offset_equals_one_call() {
        let s = spec(3, 5, true, true);
        let (all_t, all_f) = batch_plan(&s, 10, 42, 100).unwrap();
        let (a_t, a_f) = batch_plan(&s, 4, 42, 100).unwrap();
        let (b_t, b_f) = batch_plan(&s, 6, 42, 104).unwrap();
        assert_eq!(all_t, [a_t, b_t].concat());
        assert_eq!(all_f, [a_f, b_f].concat());
    }

    #[test]
    fn streams_are_independent() {
        // Different images of one run get different plans...
        let (tiles, _) = batch_plan(&spec(8, 8, true, false), 50, 0, 0).unwrap();
        let distinct: std::collections::HashSet<&[u32]> = tiles.chunks(64).collect();
        assert_eq!(distinct.len(), 50);
        // ...and their raw streams do not overlap.
        let mut a = image_rng(0, 0);
        let mut b = image_rng(0, 1);
        let xs: Vec<u64> = (0..64).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..64).map(|_| b.next_u64()).collect();
        assert!(xs.iter().all(|x| !ys.contains(x)));
    }

    #[test]
    fn transform_codes_respect_tile_shape() {
        let square = spec(4, 4, true, true);
        let (_, codes) = batch_plan(&square, 50, 0, 0).unwrap();
        assert!(codes.iter().all(|&c| c < 8));
        assert!(
            codes.iter().any(|&c| c >= 4),
            "square tiles should get transposes"
        );

        let oblong = PlanSpec {
            square_tiles: false,
            ..square
        };
        let (_, codes) = batch_plan(&oblong, 50, 0, 0).unwrap();
        assert!(codes.iter().all(|&c| c < 4));
        assert!(codes.iter().any(|&c| c > 0));
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut rng = image_rng(9, 0);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[below(&mut rng, 6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn huge_batches_are_errors_not_aborts() {
        let s = spec(4, 4, true, false);
        let err = batch_plan(&s, 1_000_000_000_000, 0, 0).unwrap_err();
        assert!(!err.is_out_of_memory());
        assert!(err.to_string().contains("offset"), "{err}");
        assert!(batch_plan(&s, MAX_PLAN_TILES / 16 + 1, 0, 0).is_err());
        assert!(batch_plan(&s, usize::MAX, 0, 0).is_err());
        // Within the bound an impossible allocation is still an error.
        let err = zeroed_vec::<u64>(usize::MAX / 8).unwrap_err();
        assert!(err.is_out_of_memory(), "{err}");
    }

    #[test]
    fn bad_specs_and_plans_are_errors() {
        assert!(batch_plan(&spec(0, 3, true, false), 1, 0, 0).is_err());
        assert!(batch_plan(&spec(2, 2, true, false), 2, 0, u64::MAX).is_err());
        assert!(batch_plan(&spec(2, 2, true, false), 1, 0, u64::MAX).is_ok());

        let s = spec(2, 2, false, false);
        assert!(validate_plan(&s, 1, &[0, 1, 2, 3], &[0; 4]).is_ok());
        assert!(validate_plan(&s, 1, &[0, 1, 2], &[0; 3]).is_err());
        assert!(validate_plan(&s, 1, &[0, 1, 1, 3], &[0; 4]).is_err());
        assert!(validate_plan(&s, 1, &[0, 1, 2, 4], &[0; 4]).is_err());
        assert!(validate_plan(&s, 1, &[0, 1, 2, 3], &[0, 0, 0, 8]).is_err());
        let oblong = PlanSpec {
            square_tiles: false,
            ..s
        };
        assert!(validate_plan(&oblong, 1, &[0, 1, 2, 3], &[0, 0, 0, 4]).is_err());
    }
}
