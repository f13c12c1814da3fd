package org.minicpmvedge.app

import android.content.ContentProvider
import android.content.ContentValues
import android.database.Cursor
import android.database.MatrixCursor
import android.net.Uri
import android.os.ParcelFileDescriptor
import android.provider.OpenableColumns
import java.io.File
import java.io.FileNotFoundException

/**
 * The one file the camera app writes a full-size photo into, as a content URI we own
 * (content://org.minicpmvedge.app.capture/photo.jpg). Framework ContentProvider only: works on
 * API 23 and on current Android, where file:// URIs may not leave the app (FileUriExposedException)
 * and AndroidX's FileProvider is not available to the offline build. Not exported: the camera app
 * gets access only through the URI grant on the ACTION_IMAGE_CAPTURE intent.
 */
class CaptureProvider : ContentProvider() {
    override fun onCreate(): Boolean = true

    override fun openFile(
        uri: Uri,
        mode: String,
    ): ParcelFileDescriptor {
        val file = fileFor(uri)
        file.parentFile?.mkdirs()
        return ParcelFileDescriptor.open(file, ParcelFileDescriptor.parseMode(mode))
    }

    override fun getType(uri: Uri): String = "image/jpeg"

    override fun query(
        uri: Uri,
        projection: Array<out String>?,
        selection: String?,
        selectionArgs: Array<out String>?,
        sortOrder: String?,
    ): Cursor {
        val file = fileFor(uri)
        val columns = projection ?: arrayOf(OpenableColumns.DISPLAY_NAME, OpenableColumns.SIZE)
        val row: List<Any?> =
            columns.map { column ->
                when (column) {
                    OpenableColumns.DISPLAY_NAME -> file.name
                    OpenableColumns.SIZE -> file.length()
                    else -> null
                }
            }
        return MatrixCursor(columns, 1).apply { addRow(row.toTypedArray()) }
    }

    override fun insert(
        uri: Uri,
        values: ContentValues?,
    ): Uri? = null

    override fun update(
        uri: Uri,
        values: ContentValues?,
        selection: String?,
        selectionArgs: Array<out String>?,
    ): Int = 0

    override fun delete(
        uri: Uri,
        selection: String?,
        selectionArgs: Array<out String>?,
    ): Int = if (fileFor(uri).delete()) 1 else 0

    private fun fileFor(uri: Uri): File {
        if (uri.path != "/$PHOTO_NAME") throw FileNotFoundException("no such file: $uri")
        return photoFile(context ?: throw FileNotFoundException("provider not attached"))
    }

    companion object {
        const val AUTHORITY = "org.minicpmvedge.app.capture"
        private const val PHOTO_NAME = "photo.jpg"

        val PHOTO_URI: Uri = Uri.parse("content://$AUTHORITY/$PHOTO_NAME")

        fun photoFile(context: android.content.Context): File = File(File(context.cacheDir, "capture"), PHOTO_NAME)
    }
}
