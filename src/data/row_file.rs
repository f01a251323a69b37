//! A file of fixed-size tensor rows, written and read a row at a time at its offset (`pwrite` / `pread`), so
//! that a reader holds only the rows it asked for: memory stays flat however many rows the file has (a memory
//! map would count every page it touched in the process's resident set). Several processes may write disjoint
//! rows of one file at once.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The element types a [`RowFile`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowKind {
    /// 32-bit floats, native byte order.
    F32,
    /// Bytes.
    U8,
}

impl RowKind {
    fn kind(self) -> Kind {
        match self {
            RowKind::F32 => Kind::Float,
            RowKind::U8 => Kind::Uint8,
        }
    }

    fn bytes(self) -> usize {
        match self {
            RowKind::F32 => 4,
            RowKind::U8 => 1,
        }
    }
}

/// `rows` rows of `row_shape` elements of `kind`, back to back, no header (the shape lives with whoever made
/// the file).
#[derive(Debug)]
pub struct RowFile {
    file: File,
    path: PathBuf,
    kind: RowKind,
    row_shape: Vec<i64>,
    rows: i64,
}

impl RowFile {
    fn row_bytes(kind: RowKind, row_shape: &[i64]) -> usize {
        row_shape.iter().product::<i64>() as usize * kind.bytes()
    }

    /// Creates (or truncates) `path` with room for `rows` rows, all zero until written.
    pub fn create(path: &Path, kind: RowKind, row_shape: &[i64], rows: i64) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| Error::io(path, e))?;
        file.set_len(rows as u64 * Self::row_bytes(kind, row_shape) as u64).map_err(|e| Error::io(path, e))?;
        Ok(Self { file, path: path.to_path_buf(), kind, row_shape: row_shape.to_vec(), rows })
    }

    /// Opens an existing file of `rows` rows for reading and writing; its length must be exactly that.
    pub fn open(path: &Path, kind: RowKind, row_shape: &[i64], rows: i64) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
        let want = rows as u64 * Self::row_bytes(kind, row_shape) as u64;
        let have = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if have != want {
            return Err(Error::format(
                path,
                format!("{have} bytes where {rows} rows of {row_shape:?} {kind:?} take {want}: the file is damaged; delete it"),
            ));
        }
        Ok(Self { file, path: path.to_path_buf(), kind, row_shape: row_shape.to_vec(), rows })
    }

    /// Number of rows.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    fn check_index(&self, i: i64) -> Result<()> {
        if i < 0 || i >= self.rows {
            return Err(Error::Config(format!("row {i} out of range 0..{} of {}", self.rows, self.path.display())));
        }
        Ok(())
    }

    /// Writes row `i` from `row` (of the file's row shape; converted to its element type, moved to the CPU).
    pub fn write_row(&self, i: i64, row: &Tensor) -> Result<()> {
        self.check_index(i)?;
        if row.size() != self.row_shape {
            return Err(Error::Config(format!("a row of {:?} for {} rows of {:?}", row.size(), self.path.display(), self.row_shape)));
        }
        let t = row.f_to_device(tch::Device::Cpu)?.f_to_kind(self.kind.kind())?.f_contiguous()?;
        let n = Self::row_bytes(self.kind, &self.row_shape);
        let mut bytes = vec![0u8; n];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        self.file.write_all_at(&bytes, i as u64 * n as u64).map_err(|e| Error::io(&self.path, e))
    }

    /// Rows `indices`, `[k, row shape...]` of the file's element type, on the CPU.
    pub fn read_rows(&self, indices: &[i64]) -> Result<Tensor> {
        let n = Self::row_bytes(self.kind, &self.row_shape);
        let mut bytes = vec![0u8; n * indices.len()];
        for (chunk, &i) in bytes.chunks_mut(n.max(1)).zip(indices) {
            self.check_index(i)?;
            self.file.read_exact_at(chunk, i as u64 * n as u64).map_err(|e| Error::io(&self.path, e))?;
        }
        let shape: Vec<i64> = std::iter::once(indices.len() as i64).chain(self.row_shape.iter().copied()).collect();
        Ok(Tensor::f_from_data_size(&bytes, &shape, self.kind.kind())?)
    }

    /// Flushes what was written to the disk.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_in_any_order_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.f32");
        let f = RowFile::create(&path, RowKind::F32, &[2, 3], 4).unwrap();
        let rows: Vec<Tensor> = (0..4).map(|i| Tensor::randn([2, 3], (Kind::Float, tch::Device::Cpu)) + i as f64).collect();
        for i in [2, 0, 3, 1] {
            f.write_row(i, &rows[i as usize]).unwrap();
        }
        let back = RowFile::open(&path, RowKind::F32, &[2, 3], 4).unwrap().read_rows(&[3, 0, 3]).unwrap();
        assert!(back.equal(&Tensor::stack(&[&rows[3], &rows[0], &rows[3]], 0)));
        assert!(f.read_rows(&[4]).unwrap_err().to_string().contains("out of range"));
        assert!(f.write_row(0, &Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))).is_err());
        // A file of the wrong length is refused, not misread.
        assert!(RowFile::open(&path, RowKind::F32, &[2, 3], 5).unwrap_err().to_string().contains("damaged"));

        let u8_path = dir.path().join("rows.u8");
        let g = RowFile::create(&u8_path, RowKind::U8, &[2], 2).unwrap();
        g.write_row(1, &Tensor::from_slice(&[7u8, 255])).unwrap();
        let r = g.read_rows(&[1, 0]).unwrap();
        assert_eq!(r.kind(), Kind::Uint8);
        assert_eq!(Vec::<u8>::try_from(r.flatten(0, -1)).unwrap(), vec![7, 255, 0, 0]);
    }
}
