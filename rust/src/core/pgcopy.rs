//! PostgreSQL's binary `COPY … FROM STDIN` format, written without a
//! driver: a signature and header, then per row a field count and each
//! field as a big-endian length (-1 for NULL) and its bytes, then a
//! trailer. A batch's rows go to the server as one buffer built here, so
//! the store's Python code never touches a row.

/// `PGCOPY\n\xff\r\n\0`, then the flags word and the header extension
/// length (both zero).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// One COPY stream being written.
pub struct CopyBuffer {
    buf: Vec<u8>,
}

impl CopyBuffer {
    /// A stream for about `rows` rows of about `row_bytes` bytes each.
    pub fn new(rows: usize, row_bytes: usize) -> CopyBuffer {
        let mut buf = Vec::with_capacity(HEADER.len() + rows * row_bytes + 2);
        buf.extend_from_slice(HEADER);
        CopyBuffer { buf }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: u16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        let len = i32::try_from(bytes.len()).expect("a COPY field under 2 GiB");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// `text` (UTF-8, as the server's encoding for this database).
    pub fn text(&mut self, value: Option<&str>) {
        match value {
            Some(s) => self.field(s.as_bytes()),
            None => self.null(),
        }
    }

    /// `float8`.
    pub fn float8(&mut self, value: Option<f64>) {
        match value {
            Some(x) => self.field(&x.to_bits().to_be_bytes()),
            None => self.null(),
        }
    }

    /// `int4`.
    pub fn int4(&mut self, value: i32) {
        self.field(&value.to_be_bytes());
    }

    /// `int8`.
    pub fn int8(&mut self, value: i64) {
        self.field(&value.to_be_bytes());
    }

    /// `bool`.
    pub fn boolean(&mut self, value: bool) {
        self.field(&[u8::from(value)]);
    }

    /// The finished stream (with its trailer).
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_of_each_type() {
        let mut c = CopyBuffer::new(1, 64);
        c.row(6);
        c.text(Some("é"));
        c.text(None);
        c.float8(Some(1.5));
        c.int4(-2);
        c.int8(3);
        c.boolean(true);
        let out = c.finish();
        let mut want = HEADER.to_vec();
        want.extend_from_slice(&[0, 6]);
        want.extend_from_slice(&[0, 0, 0, 2, 0xc3, 0xa9]);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&1.5f64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe]);
        want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 3]);
        want.extend_from_slice(&[0, 0, 0, 1, 1]);
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(out, want);
    }

    #[test]
    fn an_empty_stream_is_header_and_trailer() {
        let out = CopyBuffer::new(0, 0).finish();
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(out.len(), HEADER.len() + 2);
    }
}
