//! Message framing shared by the pod protocols (`/pod/infer`, `/pod/blob`): a 4-byte
//! big-endian length, then that many bytes of JSON. Each protocol passes its own size limit,
//! since what a frame may carry differs (a prompt, a manifest of a large file, a request of a
//! few fields).

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or broke.
    #[error("stream closed: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length is over the limit.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Writes one frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, message: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    // One write for header and body: on a libp2p stream that is one Yamux frame, not two.
    w.write_all(&encode_frame(message)?).await?;
    w.flush().await
}

/// One frame as it goes on the wire: the length, then the JSON.
pub fn encode_frame<T: Serialize>(message: &T) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// Reads one frame of at most `max` bytes. The length is checked before anything is
/// allocated, so a peer cannot make this side reserve more than `max`.
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Message {
        name: String,
        count: u32,
    }

    fn message() -> Message {
        Message {
            name: "héllo".into(),
            count: 7,
        }
    }

    #[tokio::test]
    async fn frames_are_a_big_endian_length_then_json() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &message()).await.unwrap();
        let body = serde_json::to_vec(&message()).unwrap();
        assert_eq!(buf[..4], (body.len() as u32).to_be_bytes());
        assert_eq!(buf[4..], body[..]);
        let mut r = Cursor::new(buf);
        assert_eq!(
            read_frame::<_, Message>(&mut r, 1024).await.unwrap(),
            message()
        );
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_before_its_body_is_read() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &message()).await.unwrap();
        let len = buf.len() - 4;
        // Exactly the limit passes; one byte less does not.
        let mut r = Cursor::new(buf.clone());
        assert!(read_frame::<_, Message>(&mut r, len).await.is_ok());
        let mut r = Cursor::new(buf);
        match read_frame::<_, Message>(&mut r, len - 1).await {
            Err(FrameError::TooLarge { len: l, max }) => {
                assert_eq!((l, max), (len, len - 1));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Only the header was consumed.
        assert_eq!(r.position(), 4);
        // A header claiming 4 GiB with nothing behind it is refused, not allocated.
        let mut r = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame::<_, Message>(&mut r, 1 << 20).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_frames_are_io_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &message()).await.unwrap();
        // Cut in the header, and cut in the body.
        for cut in [0, 2, 4, buf.len() - 1] {
            let mut r = Cursor::new(buf[..cut].to_vec());
            assert!(
                matches!(
                    read_frame::<_, Message>(&mut r, 1024).await,
                    Err(FrameError::Io(_))
                ),
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn garbage_and_wrongly_shaped_json_are_malformed() {
        for body in [&b"{{{{{"[..], b"", b"[1, 2]", br#"{"name": 3, "count": 1}"#] {
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            let mut r = Cursor::new(frame);
            assert!(
                matches!(
                    read_frame::<_, Message>(&mut r, 1024).await,
                    Err(FrameError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[tokio::test]
    async fn frames_follow_one_another() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &message()).await.unwrap();
        write_frame(
            &mut buf,
            &Message {
                name: String::new(),
                count: 0,
            },
        )
        .await
        .unwrap();
        let mut r = Cursor::new(buf);
        assert_eq!(
            read_frame::<_, Message>(&mut r, 64).await.unwrap(),
            message()
        );
        assert_eq!(read_frame::<_, Message>(&mut r, 64).await.unwrap().count, 0);
        assert!(matches!(
            read_frame::<_, Message>(&mut r, 64).await,
            Err(FrameError::Io(_))
        ));
    }
}
